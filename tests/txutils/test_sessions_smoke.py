import pytest

from tests.dbsessions import wait_blocked
from txutils import sqlstate_of


@pytest.mark.django_db(transaction=True)
def test_two_sessions_block_and_see_each_other(kv_table, session):
    t1 = session("read committed", name="T1")
    t2 = session("serializable", name="T2")
    assert t1.isolation_in_force == "read committed"
    assert t2.isolation_in_force == "serializable"
    assert t1.run("UPDATE test SET value = 11 WHERE id = 1") == 1
    pending = t2.submit("UPDATE test SET value = 12 WHERE id = 1")
    wait_blocked(t2)
    t1.commit()
    with pytest.raises(Exception) as failure:
        pending.result(timeout=10)
    assert sqlstate_of(failure.value) == "40001"
