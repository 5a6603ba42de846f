"""The deployment: nginx in front of gunicorn (``serve.py`` starts both; ``nginx.conf``)."""
