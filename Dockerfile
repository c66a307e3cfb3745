# One image for the orchestrator, the coordination worker, GPU judgment workers and Flower.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY db ./db
COPY migrations ./migrations
COPY workers ./workers
COPY orchestrator ./orchestrator
# Editable, so db.migrate finds migrations/ next to the packages.
RUN pip install -e . && useradd --create-home --uid 1000 cvgl
USER cvgl
CMD ["orchestrator", "--help"]
