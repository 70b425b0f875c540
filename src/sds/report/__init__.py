"""The report: Markdown and CSV tables (`report`), its figures (`figures` builds them from results, `plots` draws), model cards."""
