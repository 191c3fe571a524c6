"""``python -m zoo_prune.integrations.lmms_eval_cli [lmms-eval's arguments]``: lmms-eval's own command
line (``python -m lmms_eval``), indexing only the tasks of ``--include_path``.

lmms-eval's ``TaskManager`` parses all of its ~3,200 task YAMLs at every start (about 20 s of a
testbed run of 1,500 questions); a run whose tasks all live in ``--include_path`` (the testbed's,
the rehearsal's stand-ins, which ``include:`` lmms-eval's own YAMLs by path) does not need that
index. Everything else is lmms-eval's CLI unchanged. ``zoo_prune.evaluation.run_lmms_eval`` uses
this entry point whenever it passes an ``include_path``.
"""

from __future__ import annotations


def main() -> None:
    from lmms_eval import tasks

    index = tasks.TaskManager.__init__

    def local_tasks_only(self, *args, include_defaults: bool = True, **kwargs):
        index(self, *args, include_defaults=False, **kwargs)

    tasks.TaskManager.__init__ = local_tasks_only
    from lmms_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
