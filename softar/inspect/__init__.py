"""`softar inspect`: one generation as an interactive, self-contained HTML page (`page`), drawn from a payload that
the generation API's trace fills (`payload`); `browser` renders it in headless Chromium for tests and screenshots."""

from softar.inspect.page import check_targets, render_html, write_page, write_png
from softar.inspect.payload import task_payload, text_payload

__all__ = ["check_targets", "render_html", "task_payload", "text_payload", "write_page", "write_png"]
