# Two images from one file. The default, `serve`: nginx holding the clients, gunicorn behind
# it and the DICOM node, each model version run from its ONNX file on onnxruntime: no PyTorch
# (requirements-serve.txt). `train`: the same plus PyTorch and the training code, for
# retraining, site adaptation and promotion against the same volumes.
#   docker build -t pneumonia-screening .
#   docker build --target train -t pneumonia-screening-train .
#   docker run -p 8000:8000 -e SECRET_KEY=... -v pneumonia-models:/var/lib/pneumonia/models \
#     -v pneumonia-cases:/var/lib/pneumonia/cases pneumonia-screening
# The model store and the case record (SQLite; or DATABASE_URL=postgresql+psycopg://...)
# are volumes: they outlive the container; the store is seeded with the bundled model on
# first start. Retraining and promotion run in the train image with the same volumes
# (README, "Retraining"), with the dataset mounted at /data/chest_xray.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PNEUMONIA_MODEL_STORE=/var/lib/pneumonia/models \
    DATABASE_URL=sqlite:////var/lib/pneumonia/cases/cases.sqlite3 \
    CHEST_XRAY_DATA=/data/chest_xray

WORKDIR /srv/app

# nginx buffers each request whole before gunicorn sees it: slow clients cost no worker.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home screening \
    && mkdir -p /var/lib/pneumonia/models /var/lib/pneumonia/cases /srv/app/.cache \
    && chown screening /var/lib/pneumonia/models /var/lib/pneumonia/cases /srv/app/.cache

COPY requirements-serve.txt .
RUN pip install -r requirements-serve.txt

COPY app ./app
COPY model ./model
COPY templates ./templates
COPY static ./static
COPY deploy ./deploy
COPY wsgi.py gunicorn.conf.py ./
VOLUME /var/lib/pneumonia/models /var/lib/pneumonia/cases

# ---- train: PyTorch (the CPU build of the pinned release: the default wheel carries ~3 GB
# of CUDA libraries that a CPU machine never uses) and the training code.
FROM base AS train
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt
COPY training ./training
USER screening
CMD ["python", "-m", "training.store", "list"]

# ---- serve (the default, last): what the serving processes need, and nothing of PyTorch.
FROM base AS serve
USER screening
EXPOSE 8000
# The DICOM node listens here when DICOM_PORT is set (README, "Films from the PACS").
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# SIGTERM (docker stop) lets nginx, then gunicorn, finish the requests they hold: give it
# REQUEST_BUDGET_S plus a margin (docker stop -t 40).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "deploy.serve"]
