# syntax=docker/dockerfile:1
# voucher-ledger: build with uv from the lock file, run as a non-root user.
#   docker build -t voucher-ledger .
#   docker run -e DATABASE_URL=postgresql+asyncpg://user:pass@db:5432/vl -p 8000:8000 voucher-ledger
# Without DATABASE_URL the container starts the embedded PostgreSQL in /app/data (mount a volume there).

FROM python:3.12-slim AS build
RUN pip install --no-cache-dir "uv>=0.9,<1"
ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PYTHON=/usr/local/bin/python3
WORKDIR /app
# dependencies first: this layer is reused until uv.lock changes
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project
COPY alembic.ini ./
COPY app ./app
COPY ledger ./ledger
COPY vouchers ./vouchers
COPY migrations ./migrations
RUN uv sync --frozen --no-dev

FROM python:3.12-slim
RUN useradd --system --uid 10001 --create-home --home-dir /home/vl vl \
    && mkdir -p /app/data && chown vl /app/data
WORKDIR /app
COPY --from=build --chown=root:root /app /app
ENV PATH=/app/.venv/bin:$PATH \
    VL_DATA_DIR=/app/data \
    PYTHONUNBUFFERED=1
USER vl
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["voucher-ledger", "serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
