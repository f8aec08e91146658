"""``ekdc compare``: does the multi-branch student earn its place on this data? The recipe's student
against the same student trained alone and against one-branch students of equal MACs or equal measured
latency, each over several seeds, sharing teachers and the teacher-output cache.

    rows.py      the row grammar ([plain:|planned:]BASE[+dkd][+conf][+feat][+k<K>])
    students.py  the equal-MAC and the planned one-branch students
    grid.py      ``compare``: teachers once, every cell a resumable run folder, the latencies
    report.py    the JSON, the table, the plot
"""
from .grid import compare
from .report import compare_table, write_compare_plot
from .rows import DEFAULT_ROWS, Row, parse_row, parse_rows, parse_seeds

__all__ = ["DEFAULT_ROWS", "Row", "compare", "compare_table", "parse_row", "parse_rows", "parse_seeds",
           "write_compare_plot"]
