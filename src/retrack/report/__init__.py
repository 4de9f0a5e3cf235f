"""`retrack report`: one self-contained HTML page per unlearning run, demo or experiment folder."""

from retrack.report.build import REPORT_NAME, write_report
from retrack.report.options import ReportOptions

__all__ = ["REPORT_NAME", "ReportOptions", "write_report"]
