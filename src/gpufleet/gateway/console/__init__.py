"""The web console at ``/ui``: the fleet, models, deploying, usage and cost, a playground.

Served by the gateway itself — no other server, and no Node build step: the pages are plain
HTML, CSS and JavaScript shipped inside the package (``static/``, ``templates/``), charts drawn
by uPlot (MIT, ``static/vendor``). A person signs in with an API key and gets a session cookie
(``sessions``); every page and action then goes through the same handlers as the admin API and
the inference API, with that key's role deciding what is shown and allowed (``routes``). The
views no API route gives — the fleet's tree, the deploy form's preview — are pure functions of
plain values (``fleet``, ``deploy``).
"""

from gpufleet.gateway.console.handlers import Console, routes
from gpufleet.gateway.console.sessions import COOKIE, CSRF_HEADER, SESSION_S, Sessions, csrf_token

__all__ = ["COOKIE", "CSRF_HEADER", "SESSION_S", "Console", "Sessions", "csrf_token", "routes"]
