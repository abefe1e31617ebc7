"""Self-contained HTML (and JSON) reports of alerts: `render_report(lake, alerts, out_dir, title, window)`."""

from tracepipe.report.html import build_report_data, render_html, render_report

__all__ = ["build_report_data", "render_html", "render_report"]
