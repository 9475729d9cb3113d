"""The address guard: every IPv6 form that embeds or maps an IPv4 address is judged as that
IPv4 address; image fetches, their redirects and webhooks all ask the same guard."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import Observe
from tests.support.trickle import Trickle
from worker.callbacks.webhook import WebhookPublisher
from worker.errors import ForbiddenReference, InvalidCallback
from worker.messages import ModerationResult, Status
from worker.storage import HttpStore, NetworkGuard
from worker.storage.netguard import embedded_ipv4, is_public

PUBLIC_V4 = IPv4Address("8.8.8.8")
MASK32 = 0xFFFFFFFF


def compatible(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(int(v4))


def mapped(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(0xFFFF << 32 | int(v4))


def siit(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(0xFFFF << 48 | int(v4))


def nat64(v4: IPv4Address) -> IPv6Address:
    return IPv6Address(0x64FF9B << 96 | int(v4))


def sixtofour(v4: IPv4Address, host: int = 1) -> IPv6Address:
    return IPv6Address(0x2002 << 112 | int(v4) << 80 | host)


def teredo(server: IPv4Address, client: IPv4Address, port: int = 0x1234) -> IPv6Address:
    flags_port = 0x8000 << 16 | (~port & 0xFFFF)
    return IPv6Address(
        0x20010000 << 96 | int(server) << 64 | flags_port << 32 | (~int(client) & MASK32)
    )


def teredo_server(v4: IPv4Address) -> IPv6Address:
    return teredo(v4, PUBLIC_V4)


def teredo_client(v4: IPv4Address) -> IPv6Address:
    return teredo(PUBLIC_V4, v4)


def nat64_local(v4: IPv4Address, length: int = 48) -> IPv6Address:
    """RFC 6052 section 2.2 under 64:ff9b:1::/48, at ``length`` (zero u-octet and suffix)."""
    prefix = 0x0064FF9B0001 << 80
    value = int(v4)
    if length == 48:
        return IPv6Address(prefix | (value >> 16) << 64 | (value & 0xFFFF) << 40)
    if length == 56:
        return IPv6Address(prefix | (value >> 24) << 64 | (value & 0xFFFFFF) << 32)
    if length == 64:
        return IPv6Address(prefix | value << 24)
    return IPv6Address(prefix | value)


FORMS: dict[str, Callable[[IPv4Address], IPv6Address]] = {
    "compatible": compatible,
    "mapped": mapped,
    "siit": siit,
    "nat64": nat64,
    "6to4": sixtofour,
    "teredo_server": teredo_server,
    "teredo_client": teredo_client,
}
GUARDS = {
    "default": NetworkGuard(),
    "loopback_allowed": NetworkGuard(("127.0.0.1/32",)),
    "ten_allowed": NetworkGuard(("10.0.0.0/8", "192.168.7.0/24")),
}
ipv4s = st.integers(0, MASK32).map(IPv4Address)


# --- extraction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "carried"),
    [
        ("::808:808", ["8.8.8.8"]),
        ("::ffff:10.0.0.1", ["10.0.0.1"]),
        ("::ffff:0:10.0.0.1", ["10.0.0.1"]),
        ("64:ff9b::169.254.169.254", ["169.254.169.254"]),
        ("2002:c0a8:0101:5::1", ["192.168.1.1"]),
        # RFC 4380's example: server 65.54.227.120, client 192.0.2.45 behind port 40000.
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
        # RFC 6052 section 2.4's /48 example under the local-use prefix, and its other layouts.
        ("64:ff9b:1:c000:2:2100::", ["192.0.2.33", "0.2.33.0", "2.33.0.0", "0.0.0.0"]),
        ("::", []),
        ("::1", []),
        ("2606:4700::1111", []),
    ],
)
def test_embedded_ipv4_follows_each_layout(address: str, carried: list[str]) -> None:
    assert sorted(map(str, embedded_ipv4(IPv6Address(address)))) == sorted(carried)


@given(ipv4s, st.sampled_from([48, 56, 64, 96]))
def test_every_rfc6052_layout_under_the_local_nat64_prefix_is_read(
    v4: IPv4Address, length: int
) -> None:
    assert v4 in embedded_ipv4(nat64_local(v4, length))


@given(ipv4s, st.integers(0, (1 << 80) - 1))
def test_6to4_reads_bits_16_to_48_whatever_the_site_bits(v4: IPv4Address, host: int) -> None:
    assert embedded_ipv4(sixtofour(v4, host)) == (v4,)


# --- the property: every form is judged as its IPv4 address ----------------------------------


@pytest.mark.parametrize("guard_name", list(GUARDS))
@pytest.mark.parametrize("form", list(FORMS))
@given(v4=ipv4s)
@example(v4=IPv4Address("127.0.0.1"))
@example(v4=IPv4Address("10.0.0.1"))
@example(v4=IPv4Address("169.254.169.254"))
@example(v4=IPv4Address("100.64.0.1"))
@example(v4=IPv4Address("192.168.7.7"))
@example(v4=PUBLIC_V4)
def test_each_form_is_judged_as_its_ipv4_address(
    form: str, guard_name: str, v4: IPv4Address
) -> None:
    guard = GUARDS[guard_name]
    address = FORMS[form](v4)
    if form == "compatible" and int(v4) <= 1:
        assert not guard.is_allowed(address)  # :: and ::1 are IPv6's own, never public
        return
    assert guard.is_allowed(address) == guard.is_allowed(v4), (address, v4)


@pytest.mark.parametrize("length", [48, 56, 64, 96])
@given(v4=ipv4s)
@example(v4=IPv4Address("10.0.0.1"))
@example(v4=PUBLIC_V4)
def test_the_local_nat64_prefix_is_never_more_open_than_its_ipv4(
    length: int, v4: IPv4Address
) -> None:
    """64:ff9b:1::/48 may be cut at any RFC 6052 length: an address passes only when every
    reading of it does, so it never passes where its IPv4 address would not."""
    for guard in GUARDS.values():
        if guard.is_allowed(nat64_local(v4, length)):
            assert guard.is_allowed(v4)


def test_the_property_sees_both_verdicts() -> None:
    for form in FORMS.values():
        assert NetworkGuard().is_allowed(form(PUBLIC_V4))
        assert not NetworkGuard().is_allowed(form(IPv4Address("10.0.0.1")))


# --- named cases -------------------------------------------------------------------------------

REFUSED = [
    "::127.0.0.1",
    "::10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0:127.0.0.1",
    "::ffff:0:10.1.2.3",
    "64:ff9b::127.0.0.1",
    "64:ff9b::10.0.0.1",
    "64:ff9b::169.254.169.254",
    "64:ff9b:1:a9fe:a9:fe00::",  # 169.254.169.254, RFC 6052 /48 layout
    "64:ff9b:1:0:a:1::",  # 10.0.0.1, RFC 6052 /64 layout
    "64:ff9b:1::a00:1",  # 10.0.0.1, /96 inside the /48
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",
    "2002:c0a8:101:1::1",
    str(teredo(IPv4Address("10.0.0.1"), PUBLIC_V4)),
    str(teredo(PUBLIC_V4, IPv4Address("127.0.0.1"))),
    str(teredo(PUBLIC_V4, IPv4Address("169.254.169.254"))),
    "fec0::1",
    "fec0:ffff::1",
    "feff:ffff::1",
    "::",
    "::1",
    "::2",
    "fd00::1",
    "fe80::1",
    "ff02::1",
    "100::1",
    "2001:db8::1",
    "2001:2::1",
    "3fff::1",
    "5f00::1",
    "::1:0:0:0",
]
ALLOWED = [
    "2606:4700:4700::1111",
    "2a00:1450:4001:81c::200e",
    "::ffff:8.8.8.8",
    "::ffff:0:8.8.8.8",
    "::8.8.8.8",
    "64:ff9b::8.8.8.8",
    "2002:808:808::1",
    str(teredo(PUBLIC_V4, IPv4Address("1.1.1.1"))),
    "8.8.8.8",
]


@pytest.mark.parametrize("address", REFUSED)
def test_refused(address: str) -> None:
    assert not NetworkGuard().is_allowed(ipaddress.ip_address(address))
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed(address: str) -> None:
    assert NetworkGuard().is_allowed(ipaddress.ip_address(address))


def test_the_allowlist_opens_an_ipv4_network_in_every_form_and_nothing_more() -> None:
    guard = NetworkGuard(("127.0.0.1/32",))
    for form in FORMS.values():
        assert guard.is_allowed(form(IPv4Address("127.0.0.1")))
        assert not guard.is_allowed(form(IPv4Address("127.0.0.2")))
    # ::1 is IPv6's own loopback, not 0.0.0.1; opening 0.0.0.0/8 does not open it.
    assert not NetworkGuard(("0.0.0.0/8",)).is_allowed(IPv6Address("::1"))
    assert NetworkGuard(("::1/128",)).is_allowed(IPv6Address("::1"))
    # An operator's own NAT64 prefix, named outright, is theirs to open.
    assert NetworkGuard(("64:ff9b::/96",)).is_allowed(nat64(IPv4Address("10.0.0.1")))
    assert NetworkGuard(("fec0::/10",)).is_allowed(IPv6Address("fec0::1"))


def test_resolved_names_are_judged_by_the_same_rule() -> None:
    answers = {"nat64.test": ["64:ff9b::a9fe:a9fe"], "mixed.test": ["8.8.8.8", "2002:a00:1::1"]}
    guard = NetworkGuard(resolver=lambda host, port: answers[host])
    for name in answers:
        with pytest.raises(ForbiddenReference):
            guard.resolve(name, 80)
    junk = NetworkGuard(resolver=lambda host, port: ["not an address"])
    with pytest.raises(ForbiddenReference):
        junk.resolve("junk.test", 80)


# --- one guard for images, redirects and webhooks ---------------------------------------------


@pytest.fixture
def redirector() -> Iterator[Callable[[str], Trickle]]:
    servers: list[Trickle] = []

    def serve(location: str) -> Trickle:
        answer = f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
        server = Trickle(answer.encode(), interval=0, prompt=len(answer))
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.close()


def test_images_redirects_and_webhooks_refuse_the_embedded_forms(
    redirector: Callable[[str], Trickle], observe: Observe
) -> None:
    literals = [f"[{address}]" for address in REFUSED if ":" in address]
    images = HttpStore(NetworkGuard(), timeout_s=2.0)
    image_codes = set()
    for literal in literals:
        with pytest.raises(ForbiddenReference) as info:
            images.read(f"http://{literal}/a.jpg", 1 << 20)
        image_codes.add(info.value.code)
    images.close()

    # The redirecting server is on 127.0.0.1, opened for it: forms of 127.0.0.1 are open too.
    opened = HttpStore(NetworkGuard(("127.0.0.1/32",)), timeout_s=2.0)
    loopback = IPv4Address("127.0.0.1")
    targets = [lit for lit in literals if loopback not in embedded_ipv4(IPv6Address(lit[1:-1]))]
    assert len(targets) >= len(literals) - 6
    redirect_codes = set()
    for literal in targets:
        server = redirector(f"http://{literal}/a.jpg")
        with pytest.raises(ForbiddenReference) as info:
            opened.read(f"http://127.0.0.1:{server.port}/start", 1 << 20)
        redirect_codes.add(info.value.code)
        assert len(server.requests) == 1
    opened.close()

    webhooks = WebhookPublisher(NetworkGuard(), "secret", retries=0, timeout_s=2.0)
    result = ModerationResult(request_id="r-1", image="s3://b/a.jpg", status=Status.OK)
    webhook_codes = set()
    for literal in literals:
        with pytest.raises(InvalidCallback, match="not public") as caught:
            webhooks.publish(f"https://{literal}/hook", result)
        webhook_codes.add(caught.value.code)
    webhooks.close()
    observe(
        "ref.ipv6_embedded",
        f"{len(literals)} IPv6 literals (IPv4-compatible, mapped, SIIT, NAT64 /96 and local "
        f"/48 layouts, 6to4, Teredo server and client, fec0::/10, ::, ::1 and other non-global "
        f"ranges) embedding 127/8, 10/8, 192.168/16, 169.254.169.254: as image URLs → "
        f"{sorted(image_codes)}, as redirect targets from an allowed host → "
        f"{sorted(redirect_codes)} (the {len(targets)} not embedding the allowed 127.0.0.1; "
        f"one GET each, never followed), as webhooks → "
        f"{sorted(webhook_codes)}; a hypothesis property over all IPv4 addresses: each of "
        f"{len(FORMS)} forms judged exactly as its IPv4 address, under 3 allowlists",
        sent=2 * len(literals) + len(targets),
        received=2 * len(literals) + len(targets),
    )
