"""`orch batch`'s dispatcher over httpx's MockTransport (one handler plays every instance's server,
by host): pulled work, slots per GPU, a dead instance's requests to another, 4xx recorded as failed,
5xx retried a bounded number of times, every instance gone ends the job."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter, defaultdict

import httpx
import pytest

from orchestrator.batch.dispatch import IN_FLIGHT_PER_GPU, MAX_ATTEMPTS, Dispatcher, Endpoint, gpus_from_health
from orchestrator.batch.jobs import Job, request_key
from orchestrator.batch.results import DirResults


def make_jobs(n: int) -> list[Job]:
    out = []
    for i in range(n):
        request = {"prompt": f"p{i}", "seed": i}
        out.append(Job(request_key(request), request, i + 1))
    return out


def answer(request: httpx.Request, images: int = 1) -> httpx.Response:
    body = json.loads(request.content)
    info = {"seed": body["seed"], "all_seeds": [body["seed"]] * images, "infotexts": [body["prompt"]] * images}
    return httpx.Response(200, json={"images": [base64.b64encode(f"png {body['prompt']} {n}".encode()).decode()
                                                for n in range(images)], "parameters": body, "info": json.dumps(info)})


class Servers:
    """Per host: a behaviour, the requests it got, and the most it had in flight at once."""

    def __init__(self, behaviours):
        self.behaviours = behaviours
        self.lock = threading.Lock()
        self.got: dict[str, list[str]] = defaultdict(list)
        self.in_flight: Counter = Counter()
        self.most: Counter = Counter()
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        behave = self.behaviours[host]
        if request.url.path == "/healthz":
            return behave(request, health=True)
        with self.lock:
            self.got[host].append(json.loads(request.content)["prompt"])
            self.in_flight[host] += 1
            self.most[host] = max(self.most[host], self.in_flight[host])
        try:
            return behave(request, health=False)
        finally:
            with self.lock:
                self.in_flight[host] -= 1


def serving(delay: float = 0.0):
    def behave(request, health):
        if health:
            return httpx.Response(200, json={"status": "ready"})
        time.sleep(delay)
        return answer(request)
    return behave


def dead(request, health):
    raise httpx.ConnectError("connection refused", request=request)


def run(dispatcher: Dispatcher, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not dispatcher.wait(0.2):
        assert time.monotonic() < deadline, dispatcher.stats()


def endpoint(host: str, gpus: int = 1) -> Endpoint:
    return Endpoint(host, f"http://{host}", "tok", gpus)


def test_work_is_pulled_a_fixed_number_in_flight_per_gpu_so_faster_instances_take_more(tmp_path):
    servers = Servers({"slow": serving(0.3), "fast": serving(0.02), "two-gpus": serving(0.3)})
    jobs = make_jobs(6 * IN_FLIGHT_PER_GPU * 4)
    d = Dispatcher(jobs, DirResults(tmp_path), transport=servers.transport)
    d.expect(3)
    d.add(endpoint("slow"))
    d.add(endpoint("fast"))
    d.add(endpoint("two-gpus", gpus=2))
    run(d)
    assert d.done == len(jobs) and d.failures == [] and d.error is None
    n = IN_FLIGHT_PER_GPU
    assert servers.most["slow"] == n and servers.most["fast"] <= n and servers.most["two-gpus"] == 2 * n
    got = {host: len(prompts) for host, prompts in servers.got.items()}
    assert sum(got.values()) == len(jobs), "each request sent once"
    assert got["fast"] > got["two-gpus"] >= got["slow"] >= 1, got
    stats = d.stats()
    assert {n: s["requests"] for n, s in stats["instances"].items()} == got
    for job in jobs:
        record = json.loads((tmp_path / f"{job.key}.json").read_text())
        assert record["request"] == job.request and record["info"]["seed"] == job.request["seed"]
        assert (tmp_path / f"{job.key}.png").read_bytes() == f"png {job.request['prompt']} 0".encode()


def test_a_dead_instances_requests_go_to_another_and_it_is_given_up_once(tmp_path):
    servers = Servers({"dead": dead, "alive": serving(0.05)})
    given_up = []
    d = Dispatcher(make_jobs(8), DirResults(tmp_path), transport=servers.transport,
                   on_dead=lambda name, why: given_up.append((name, why)))
    d.expect(2)
    d.add(endpoint("dead"))
    d.add(endpoint("alive"))
    run(d)
    assert d.done == 8 and d.failures == []
    assert len(given_up) == 1 and given_up[0][0] == "dead" and "none on /healthz" in given_up[0][1]
    assert sorted(servers.got["alive"]) == sorted(f"p{i}" for i in range(8))
    assert d.stats()["instances"]["dead"]["given_up"] and d.stats()["serving"] == 1


def test_a_request_the_server_refuses_is_failed_with_its_message_and_not_sent_again(tmp_path):
    def picky(request, health):
        if health:
            return httpx.Response(200, json={"status": "ready"})
        if json.loads(request.content)["prompt"] == "p1":
            return httpx.Response(422, json={"error": "ValidationError", "detail": "steps: Input should be less than or equal to 1000"})
        return answer(request)

    servers = Servers({"a": picky, "b": picky})
    d = Dispatcher(make_jobs(4), DirResults(tmp_path), transport=servers.transport)
    d.expect(2)
    d.add(endpoint("a"))
    d.add(endpoint("b"))
    run(d)
    assert d.done == 3 and len(d.failures) == 1
    failed = d.failures[0]
    assert failed.job.line == 2 and failed.error == "refused by the server (422): steps: Input should be less than or equal to 1000"
    assert servers.got["a"].count("p1") + servers.got["b"].count("p1") == 1
    assert DirResults(tmp_path).done_keys() == {j.key for j in make_jobs(4) if j.line != 2}


def test_server_errors_are_retried_a_bounded_number_of_times(tmp_path):
    flaky_once: set[str] = set()

    def flaky(request, health):
        if health:
            return httpx.Response(200, json={"status": "ready"})
        prompt = json.loads(request.content)["prompt"]
        if prompt == "p0":
            return httpx.Response(500, json={"detail": "CUDA out of memory"})
        if prompt not in flaky_once:
            flaky_once.add(prompt)
            return httpx.Response(503, json={"detail": "GPU replica 1 died; send the request again"})
        return answer(request)

    servers = Servers({"a": flaky})
    d = Dispatcher(make_jobs(3), DirResults(tmp_path), transport=servers.transport, max_attempts=MAX_ATTEMPTS)
    d.expect(1)
    d.add(endpoint("a"))
    run(d)
    assert d.done == 2 and len(d.failures) == 1
    assert d.failures[0].error == f"a: server error 500: CUDA out of memory; gave up after {MAX_ATTEMPTS} tries"
    assert servers.got["a"].count("p0") == MAX_ATTEMPTS
    assert servers.got["a"].count("p1") == 2 and servers.got["a"].count("p2") == 2


def test_when_every_instance_is_gone_the_job_ends_with_the_reasons(tmp_path):
    servers = Servers({"x": dead, "y": serving()})
    d = Dispatcher(make_jobs(3), DirResults(tmp_path), transport=servers.transport)
    d.expect(3)
    d.add(endpoint("x"))
    time.sleep(0.5)
    assert d.error is None and not d.finished(), "instances still starting may yet take the work"
    d.gone("y", "no capacity in us-east-1")
    assert d.error is None
    d.gone("z", "the provider refused the key")
    run(d)
    assert d.error.startswith("every instance of the job is gone (")
    assert "y: no capacity in us-east-1" in d.error and "z: the provider refused the key" in d.error and "x: " in d.error
    assert d.done == 0 and d.stats()["pending"] == 3


def test_a_refused_token_gives_the_instance_up_and_its_request_goes_elsewhere(tmp_path):
    def refuses(request, health):
        return httpx.Response(200, json={"status": "ready"}) if health else httpx.Response(401, json={"detail": "bad token"})

    servers = Servers({"a": refuses, "b": serving(0.05)})
    given_up = []
    d = Dispatcher(make_jobs(4), DirResults(tmp_path), transport=servers.transport, on_dead=lambda n, w: given_up.append(n))
    d.expect(2)
    d.add(endpoint("a"))
    d.add(endpoint("b"))
    run(d)
    assert d.done == 4 and d.failures == [] and given_up == ["a"]


def test_results_that_cannot_be_written_end_the_job(tmp_path):
    servers = Servers({"a": serving()})
    (tmp_path / "out").write_text("")  # a file where the directory should be
    d = Dispatcher(make_jobs(2), DirResults(tmp_path / "out"), transport=servers.transport)
    d.expect(1)
    d.add(endpoint("a"))
    run(d)
    assert d.error.startswith("cannot write the results: cannot write ") and d.done == 0


def test_a_short_job_is_shared_with_an_instance_still_starting(tmp_path):
    """The first instance up takes at most its share while the other starts: a short job is not
    all taken by one instance while the other is billed for nothing."""
    # 2 s a request: the first instance is still on its first share when the second joins, however
    # loaded the machine running this is.
    servers = Servers({"first": serving(2.0), "second": serving(2.0)})
    d = Dispatcher(make_jobs(9), DirResults(tmp_path), transport=servers.transport)
    d.expect(2)
    d.add(endpoint("first"))
    time.sleep(0.5)
    assert servers.most["first"] <= 5, "its share of 9 requests over 2 instances"
    d.add(endpoint("second"))
    run(d)
    assert d.done == 9 and len(servers.got["second"]) >= 1, dict(servers.got)


def test_once_every_instance_is_up_an_instance_takes_all_its_slots(tmp_path):
    servers = Servers({"only": serving(0.3)})
    d = Dispatcher(make_jobs(2 * IN_FLIGHT_PER_GPU), DirResults(tmp_path), transport=servers.transport)
    d.expect(1)
    d.add(endpoint("only"))
    run(d)
    assert servers.most["only"] == IN_FLIGHT_PER_GPU


def test_an_instance_that_another_joined_takes_both_instances_requests_at_once(tmp_path):
    """A cluster (orchestrator/batch/cluster.py): the second instance serves through the first's URL,
    which then gets both instances' requests in flight, and the job does not wait for the second."""
    servers = Servers({"head": serving(0.3)})
    jobs = make_jobs(8 * IN_FLIGHT_PER_GPU)
    d = Dispatcher(jobs, DirResults(tmp_path), transport=servers.transport)
    d.expect(2)
    d.add(endpoint("head"))
    time.sleep(0.5)
    assert servers.most["head"] <= IN_FLIGHT_PER_GPU
    d.joined("worker", "head")
    d.grow("head", 2)
    run(d)
    assert d.done == len(jobs) and d.error is None and d.failures == []
    assert servers.most["head"] == 2 * IN_FLIGHT_PER_GPU, servers.most
    stats = d.stats()
    assert stats["instances"]["head"]["gpus"] == 2 and stats["joined"] == {"worker": "head"}
    assert set(servers.got) == {"head"}


def test_when_a_head_is_given_up_the_instances_that_joined_it_are_waited_for_again(tmp_path):
    """A cluster's head that dies: the job does not end while the instances that had joined it
    start their own servers again (cluster.py), and they finish it. (It had ended at once.)"""
    servers = Servers({"head": dead, "worker": serving(0.02)})
    jobs = make_jobs(3 * IN_FLIGHT_PER_GPU)
    d = Dispatcher(jobs, DirResults(tmp_path), transport=servers.transport)
    d.expect(2)
    d.joined("worker", "head")
    d.add(endpoint("head"))
    deadline = time.monotonic() + 20
    while "head" not in {n for n, s in d.stats()["instances"].items() if s["given_up"]}:
        assert time.monotonic() < deadline, d.stats()
        time.sleep(0.05)
    time.sleep(0.3)
    assert d.error is None and not d.finished(), "the job waits for the instance that had joined the head"
    assert d.stats()["joined"] == {}
    d.add(endpoint("worker"))  # its own server again
    run(d)
    assert d.done == len(jobs) and d.error is None
    assert d.stats()["instances"]["worker"]["requests"] == len(jobs)


def test_close_stops_handing_out_work(tmp_path):
    servers = Servers({"a": serving(0.2)})
    total = 10 * IN_FLIGHT_PER_GPU
    d = Dispatcher(make_jobs(total), DirResults(tmp_path), transport=servers.transport)
    d.expect(1)
    d.add(endpoint("a"))
    time.sleep(0.3)
    d.close()
    time.sleep(0.6)
    sent = len(servers.got["a"])
    assert 1 <= sent <= 3 * IN_FLIGHT_PER_GPU and d.done < total


@pytest.mark.parametrize("health, gpus", [({}, 1), ({"gpus": 4}, 4), ({"replicas": [{}, {}]}, 2),
                                          ({"gpus": True}, 1), ({"gpus": 0, "replicas": []}, 1), ({"gpus": "8"}, 1)])
def test_gpus_come_from_healthz(health, gpus):
    assert gpus_from_health(health) == gpus
    assert endpoint("a", gpus_from_health(health)).slots == IN_FLIGHT_PER_GPU * gpus
