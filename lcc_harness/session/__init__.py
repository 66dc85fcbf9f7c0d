"""The pytest session and what joins sessions: LccSession (state.py) with its configuration (config.py) and
cases (cases.py); work shared between xdist processes (share.py, xdist_sched.py); `lcc merge` of sharded runs
(merge.py)."""
