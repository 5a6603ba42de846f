"""Helpers shared by the tests and the benches: generated images and files, a gunicorn harness.

Nothing here is a patient image: every picture is made from arrays at run time.
"""
