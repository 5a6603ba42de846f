# Pneumonia screening web app on port 8000: nginx holding the clients, gunicorn behind it
# serving the model store's model (deploy/serve.py starts and stops both).
#   docker build -t pneumonia-screening .
#   docker run -p 8000:8000 -e SECRET_KEY=... -v pneumonia-models:/var/lib/pneumonia/models \
#     -v pneumonia-cases:/var/lib/pneumonia/cases pneumonia-screening
# The model store and the case record (SQLite; or DATABASE_URL=postgresql+psycopg://...)
# are volumes: they outlive the container; the store is seeded with the bundled model on
# first start. Retraining and promotion run in the same image
# (docker exec; README, "Retraining"), with the dataset mounted at /data/chest_xray.
FROM python:3.11-slim

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
    && rm -rf /var/lib/apt/lists/*

# The CPU build of the pinned torch release (the default wheel carries ~3 GB of CUDA
# libraries that a CPU server never uses); opencv-python-headless needs no X libraries.
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY app ./app
COPY model ./model
COPY training ./training
COPY templates ./templates
COPY static ./static
COPY deploy ./deploy
COPY wsgi.py gunicorn.conf.py ./

RUN useradd --system --uid 10001 --no-create-home screening \
    && mkdir -p /var/lib/pneumonia/models /var/lib/pneumonia/cases /srv/app/.cache \
    && chown screening /var/lib/pneumonia/models /var/lib/pneumonia/cases /srv/app/.cache
USER screening
VOLUME /var/lib/pneumonia/models /var/lib/pneumonia/cases

EXPOSE 8000
# The DICOM node listens here when DICOM_PORT is set (README, "Films from the PACS").
EXPOSE 11112
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

# SIGTERM (docker stop) lets nginx, then gunicorn, finish the requests they hold: give it
# REQUEST_BUDGET_S plus a margin (docker stop -t 40).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "deploy.serve"]
