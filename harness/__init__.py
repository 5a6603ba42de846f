"""What the tests and the benches share: generated images and files, a gunicorn harness.

Nothing here is a patient image: every picture is made from arrays at run time. This
package imports ``model`` alone, never ``tests`` or ``bench``.
"""
