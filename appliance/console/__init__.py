"""The operator console: a page served at /console/ by the project's own process (project.yaml `console:`), to see
the line live, inspect an image, teach an anomaly model and choose its threshold, switch model versions, and keep
and download NG frames. Plain HTML, CSS and JavaScript inside the package (static/): no network, no build step.

routes.py    the routes and the JSON API           security.py  who may use it: sessions, key, CSRF
live.py      frames pushed to open pages           stats.py     the line's numbers, from /metrics' registry
gallery.py   NG frames kept on disk                teach.py     teaching a model (the training in its own process)
views.py     what the page is shown, as JSON       background.py  the console's low-priority disk thread
"""

from appliance.console.routes import Console, console_url

__all__ = ["Console", "console_url"]
