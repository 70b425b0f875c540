"""The report: Markdown and CSV tables (`report`), its figures (`figures` builds them, `plots` draws them),
model cards."""
