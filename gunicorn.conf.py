"""gunicorn settings: ``gunicorn wsgi:app`` reads this file from the working directory.

Each worker runs inference on the CPU, on ONNX Runtime with one thread (model/onnx_network.py),
so that workers do not fight over the same cores; a version without its ONNX file runs on
PyTorch, capped the same way. Every value can be set from the environment.
"""
import os

bind = os.environ.get("BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# A worker's threads decode their uploads side by side and share forward passes
# (model/coalesce.py): concurrent requests cost less each than one at a time.
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# On SIGTERM a worker finishes its requests: the longest one the app's budgets allow
# (REQUEST_BUDGET_S, app/config.py) and its last file's decoding.
from deploy.serve import shutdown_seconds  # noqa: E402

graceful_timeout = shutdown_seconds()
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "5"))
# Load the model once in the master: workers share its memory pages and start at once.
preload_app = os.environ.get("GUNICORN_PRELOAD", "1") == "1"
# Recycle workers now and then, so a slow leak can never grow without bound.
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "5000"))
max_requests_jitter = max_requests // 10
# The app logs one line per request (method, path, status, time); gunicorn's own
# access log would repeat it. GUNICORN_ACCESSLOG=- turns it on.
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
# No query strings or bodies in the access log: they may carry patient data.
access_log_format = '%(h)s "%(m)s %(U)s" %(s)s %(b)s %(M)sms'
# gunicorn's control socket sits at one path per user, shared by every instance on the
# host; nothing here uses it.
control_socket_disable = True
TORCH_THREADS = int(os.environ.get("TORCH_THREADS", "1"))


def post_fork(server, worker):
    import sys

    if "torch" in sys.modules:  # only where the served version has no ONNX file: never imported for this
        sys.modules["torch"].set_num_threads(TORCH_THREADS)
    import cv2

    cv2.setNumThreads(1)


def post_worker_init(worker):
    # Before its first request, a worker (new, or recycled from the preloaded master)
    # loads the store's current serving model and starts watching for promotions.
    served = getattr(worker.wsgi, "extensions", {}).get("model")
    if served is not None:
        served.current()
