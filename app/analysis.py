"""Dataset-analysis page: the t-SNE view of the training and test splits."""
from __future__ import annotations

from flask import Blueprint, render_template

bp = Blueprint("analysis", __name__)


@bp.get("/analysis")
def analysis():
    return render_template("analysis.html", plot=None)
