"""The live dashboard served by the ingest app: ``add_dashboard(app, ...)`` mounts it.

Modules: ``session`` (operator token → HttpOnly session cookie, CSRF), ``snapshot`` (the
figures, built from Redis with ``streamproc.inspect``), ``routes`` (page, SSE, DLQ view and
replay), ``panels`` (tables an application adds: ``App(panels=[Panel(...)])``). The page
(``static/``) is plain HTML, CSS and JS with inline SVG charts: nothing is loaded from another
site. See docs/dashboard.md.
"""

from streamproc.dashboard.panels import Panel, PanelData
from streamproc.dashboard.routes import (
    DASHBOARD,
    Dashboard,
    DashboardSettings,
    add_dashboard,
    dashboard_settings_from_env,
)
from streamproc.dashboard.session import COOKIE, Session, SessionStore
from streamproc.dashboard.snapshot import Sampler, Snapshot, build_snapshot

__all__ = (
    "COOKIE",
    "DASHBOARD",
    "Dashboard",
    "DashboardSettings",
    "Panel",
    "PanelData",
    "Sampler",
    "Session",
    "SessionStore",
    "Snapshot",
    "add_dashboard",
    "build_snapshot",
    "dashboard_settings_from_env",
)
