# Pneumonia screening web app: gunicorn serving the bundled model on port 8000.
#   docker build -t pneumonia-screening .
#   docker run -p 8000:8000 -e SECRET_KEY=... pneumonia-screening
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /srv/app

# The CPU build of the pinned torch release (the default wheel carries ~3 GB of CUDA
# libraries that a CPU server never uses); opencv-python-headless needs no X libraries.
COPY requirements.txt .
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu -r requirements.txt

COPY app ./app
COPY model ./model
COPY templates ./templates
COPY static ./static
COPY wsgi.py gunicorn.conf.py ./

RUN useradd --system --uid 10001 --no-create-home screening
USER screening

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status != 200)"

CMD ["gunicorn", "wsgi:app"]
