"""Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.metrics import exposition

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "metrics"}},
)
def metrics() -> Response:  # sync: reading the multiprocess files must not block the event loop
    body, content_type = exposition()
    return Response(body, media_type=content_type)
