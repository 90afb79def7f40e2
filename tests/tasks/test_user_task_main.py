"""A task named '__main__:function' that the process's __main__ lacks: the error says where the
function must live for spawned workers to reach it."""

from __future__ import annotations

import pytest

from quantsearch.tasks import TaskError, get_task


def test_a_missing_main_task_says_where_workers_look_for_it() -> None:
    with pytest.raises(TaskError) as error:
        get_task("__main__:no_such_task_function", data_dir=None, options={}, seed=0)
    message = str(error.value)
    assert "has no attribute 'no_such_task_function'" in message
    assert "top level of a script run as a file" in message
    assert "'path/to/file.py:function'" in message
