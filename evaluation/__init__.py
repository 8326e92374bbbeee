"""RQ2, the evaluation of retraining: its statistics and tables (statistics), its repetitions in one or more
processes (rq2_runs) and how an interrupted run resumes (resume)."""
