"""Hostile inputs (issue 9): generated corpus (make_hostile.py) and its runner (test_hostile.py)."""
