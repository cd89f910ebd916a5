# The service image: the API (default command), the detector worker and the MLflow server.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p detector api ingest embedded \
    && touch detector/__init__.py api/__init__.py ingest/__init__.py embedded/__init__.py \
    && pip install . \
    && pip uninstall -y anomaly-detector

COPY detector ./detector
COPY api ./api
COPY ingest ./ingest
COPY embedded ./embedded
RUN pip install --no-deps . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
    && mkdir -p /mlflow && chown app /mlflow

USER app

EXPOSE 8000 9101 5000

# The API's own health: 200 only when Redis and PostgreSQL answer. Compose overrides it for
# the worker and MLflow services.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthcheck', timeout=4)"]

# One API process per container: metrics live in process memory (no prometheus multiprocess
# mode), so scale with more containers behind a load balancer, not with --workers.
CMD ["python", "-m", "api", "--host", "0.0.0.0", "--port", "8000"]
