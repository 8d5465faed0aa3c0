"""The measured study behind docs/RESULTS.md (``python -m surm.study``): its parts
(``parts``), running them (``run``) and the report (``report``)."""
