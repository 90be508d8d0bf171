"""Typed contracts between the stages: every job kind's params and result, and the vector set.

The planner builds these models and puts their JSON form on the wire (unchanged from the
dicts it used to build, so stored plans and job ids stay valid); workers validate a job's
params with ``parse_params`` on arrival; the analyzer reads results with ``model_validate``.
"""
