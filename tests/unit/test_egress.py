"""One rule for where a provider credential may go, the same in the router's config and the vault."""

from __future__ import annotations

import pytest

from services.common import errors as E
from services.common.egress import EgressRefused, check_base_url
from services.keyvault import domain as vault
from services.router.routing import ConfigError, parse_config

ADMITTED_LOCAL = [
    "http://127.0.0.1:8000/v1",
    "http://localhost:11434/v1",
    "http://[::1]:8000/v1",
    "http://vllm.inference.svc:8000/v1",
    "http://vllm.inference.svc.cluster.local:8000/v1",
    "http://10.0.3.7:8000/v1",
    "http://192.168.1.20:11434/v1",
    "http://100.64.3.1:8000/v1",
    "http://[fd12:3456::7]:8000/v1",
    "http://ollama:11434/v1",
    "http://gpu-box.lan:8000/v1",
    "http://llm.corp.internal/v1",
    "https://api.openai.com/v1",
]
REFUSED_ALWAYS = [
    "http://169.254.169.254/",
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254/",
    "http://169.254.170.2/v2/credentials",
    "http://[fe80::1]/",
    "http://[fe80::1%25eth0]:80/",
    "http://[::ffff:169.254.169.254]/",
    "http://metadata.google.internal/computeMetadata/v1",
    "http://METADATA.google.internal./",
    "https://metadata.google.internal/",
    "http://metadata/",
    "http://instance-data.ec2.internal/",
    "http://100.100.100.200/",
    "http://[fd00:ec2::254]/",
    "http://0.0.0.0:8000/v1",
    "http://[::]:8000/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://255.255.255.255/",
    "http://2852039166/",  # 169.254.169.254 as one decimal number
    "http://0xa9fea9fe/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.254.43518/",
    "http://user:pw@127.0.0.1/",
    "http://127.0.0.1/?to=elsewhere",
    "ftp://127.0.0.1/",
    # Plain http to a public host: a key would cross the internet in clear, local or not.
    "http://api.openai.com/v1",
    "http://models.example.com:8000/v1",
    "http://8.8.8.8:8000/v1",
    "http://[2001:4860::8888]/v1",
]


def _router_config(url: str, local: bool = True) -> bytes:
    return f"""
providers:
  p: {{type: openai_compatible, base_url: "{url}", local: {str(local).lower()}}}
deployments:
  d: {{provider: p, model: m, price: m}}
models:
  a: {{candidates: [d]}}
""".encode()


def _router_admits(url: str, local: bool = True) -> bool:
    try:
        parse_config(_router_config(url, local))
    except ConfigError:
        return False
    return True


def _vault_admits(url: str) -> bool:
    try:
        vault.check_base_url(url)
    except E.InvalidArgument as err:
        assert err.reason == "BASE_URL_INVALID"
        assert url not in err.message  # never echoed
        return False
    return True


@pytest.mark.parametrize("url", ADMITTED_LOCAL)
def test_a_local_model_server_is_admitted_by_the_router_and_the_vault_alike(url: str) -> None:
    assert check_base_url(url, local=True) == url
    assert _router_admits(url)
    assert _vault_admits(url)


@pytest.mark.parametrize("url", REFUSED_ALWAYS)
def test_metadata_link_local_unspecified_multicast_and_odd_spellings_are_refused_by_both(url: str) -> None:
    with pytest.raises(EgressRefused):
        check_base_url(url, local=True)
    assert not _router_admits(url)
    assert not _vault_admits(url)


def test_plain_http_needs_local_in_the_router() -> None:
    url = "http://vllm.inference.svc:8000/v1"
    assert _router_admits(url, local=True)
    assert not _router_admits(url, local=False)
    with pytest.raises(EgressRefused, match="https"):
        check_base_url(url, local=False)


def test_the_refusal_says_why_and_never_quotes_the_url() -> None:
    with pytest.raises(EgressRefused) as info:
        check_base_url("http://169.254.169.254/latest", local=True)
    assert "link-local" in str(info.value) and "169.254" not in str(info.value)
    with pytest.raises(ConfigError, match="metadata"):
        parse_config(_router_config("http://metadata.google.internal/"))
