import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "console.settings")
# The server never reads the demo's .env (`make run` uses runserver and manage.py): one left
# on a production host, or copied into an image, must not switch DEBUG on.
os.environ.setdefault("DJANGO_ENV_FILE", "")
application = get_wsgi_application()
