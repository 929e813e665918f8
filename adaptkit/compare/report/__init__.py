"""The strategy comparison report: runs aggregated per variant, a table, plots and report files.

Input is one plain dict per (variant, seed) run, as ``adaptkit compare`` records it. Every number
may be missing or None, and a variant may have failed on every seed: the report then prints ``-``
and leaves the variant out of the plots, but never crashes.

Modules, lowest first: ``aggregate`` (summaries per variant), ``table`` (the terminal and Markdown
table), ``notes`` (how each column is measured), ``plots`` (matplotlib, imported only while
drawing), ``markdown_page`` and ``html_page`` (``report.md`` and the self-contained
``report.html``) and ``write`` (every file, written atomically).
"""

from adaptkit.compare.report.table import format_table
from adaptkit.compare.report.write import write_report_files

__all__ = ["format_table", "write_report_files"]
