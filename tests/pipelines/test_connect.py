import pytest

from pipelines.connect import ClusterUnreachable, check_reachable, connect, to_client_address, to_dashboard_url


def test_address_conversion():
    assert to_client_address("http://10.0.0.5:8265") == "ray://10.0.0.5:10001"
    assert to_client_address("https://h.example.com") == "ray://h.example.com:10001"
    assert to_client_address("ray://h:10001") == "ray://h:10001"
    assert to_dashboard_url("ray://h:10001") == "http://h:8265"
    assert to_dashboard_url("http://h:8265/") == "http://h:8265"


def test_unreachable_address_raises_and_never_starts_local_ray():
    import ray

    with pytest.raises(ClusterUnreachable, match="unreachable"):
        connect("http://127.0.0.1:1")
    with pytest.raises(ClusterUnreachable):
        connect("ray://127.0.0.1:1")
    assert not ray.is_initialized()


def test_check_reachable_bad_host():
    with pytest.raises(ClusterUnreachable):
        check_reachable("ray://127.0.0.1:9", timeout=0.5)
