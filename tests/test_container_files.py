"""Dockerfile, .dockerignore and compose.yaml, checked without a Docker engine: what they say
is read from the files and held against the code, the README and a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from clients.healthcheck import check
from server.config import Settings
from tests.conftest import Harness
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
SETTING = re.compile(r"\bALGOPLANE_[A-Z0-9_]+\b")


@dataclass
class Instruction:
    name: str
    args: str

    def exec_form(self) -> list[str]:
        """The JSON array of a CMD/ENTRYPOINT/HEALTHCHECK CMD (shell form is refused)."""
        text = self.args.split("CMD", 1)[1] if self.name == "HEALTHCHECK" else self.args
        words = json.loads(text)
        assert isinstance(words, list) and all(isinstance(w, str) for w in words), text
        return words


def stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, one list per FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found: list[list[Instruction]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, args = line.partition(" ")
        if name.upper() == "FROM":
            found.append([])
        found[-1].append(Instruction(name.upper(), " ".join(args.split())))
    return found


def final_stage() -> list[Instruction]:
    return stages()[-1]


def last(stage: list[Instruction], name: str) -> Instruction:
    matches = [i for i in stage if i.name == name]
    assert matches, f"no {name} in the final stage"
    return matches[-1]


def compose() -> dict[str, object]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def interpolate(value: str, given: dict[str, str]) -> str:
    """Compose's `${NAME:-default}` and `${NAME:?error}` with `given` as the shell's variables."""

    def one(match: re.Match[str]) -> str:
        name, op, word = match.group(1), match.group(2), match.group(3)
        if given.get(name):
            return given[name]
        assert op == ":-", f"{name} must be set: {word}"
        return word

    return re.sub(r"\$\{([A-Z0-9_]+)(:-|:\?)([^}]*)\}", one, value)


def test_the_image_is_multi_stage_slim_non_root_and_generates_its_stubs() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    build, final = all_stages[0], all_stages[-1]
    assert all(s[0].args.startswith("python:3.11-slim") for s in all_stages)
    assert build[0].args.endswith(" AS build")
    # The generator runs in the build stage; the final stage takes only its venv.
    assert any(i.name == "RUN" and "scripts/gen-protos" in i.args for i in build)
    copies = [i.args for i in final if i.name == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    user = last(final, "USER").args.split(":")[0]
    assert user not in {"root", "0"}
    assert any(i.name == "RUN" and f"--uid {user}" in i.args for i in final)


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or a parent of it decides."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        parts = path.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_the_build_context_holds_what_the_dockerfile_copies_and_no_stubs() -> None:
    sources = [
        word
        for stage in stages()
        for i in stage
        if i.name == "COPY" and not i.args.startswith("--from")
        for word in i.args.split()[:-1]
    ]
    assert "scripts/gen-protos" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _dockerignore_excludes(source), f"{source} is left out of the build context"
    assert not _dockerignore_excludes("server/store/keys.py")
    assert not _dockerignore_excludes("protos/algoplane/v1/strategy.proto")
    for stub in sorted((ROOT / "protos").rglob("*_pb2*")):
        assert _dockerignore_excludes(str(stub.relative_to(ROOT))), stub
    assert _dockerignore_excludes("clients/node/node_modules/long/index.js")
    assert _dockerignore_excludes(".venv/bin/python")


def test_the_image_runs_the_command_the_readme_documents() -> None:
    final = final_stage()
    entry = [i for i in final if i.name == "ENTRYPOINT"]
    command = (entry[-1].exec_form() if entry else []) + last(final, "CMD").exec_form()
    documented = re.findall(r"The image runs `([^`]+)`", (ROOT / "README.md").read_text())
    assert documented == [shlex.join(command)]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[command[0]] == "server.cli:main"
    assert command[1:] == ["serve"]  # a subcommand server/cli.py has


def test_every_setting_named_is_a_real_one() -> None:
    named = set(SETTING.findall(DOCKERFILE.read_text())) | set(SETTING.findall(COMPOSE.read_text()))
    assert named, "no settings found: the files are not configured through ALGOPLANE_*"
    fields = {f"ALGOPLANE_{name.upper()}" for name in Settings.model_fields}
    assert named <= fields, named - fields


def _image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.name == "ENV":
            for pair in shlex.split(instruction.args):
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_compose_parses_and_configures_the_server_with_valid_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = compose()["services"]
    assert isinstance(services, dict)
    assert set(services) == {"server", "redis", "postgres"}
    server, redis, postgres = services["server"], services["redis"], services["postgres"]
    assert server["build"] == "."
    assert server["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["command"][redis["command"].index("--appendfsync") + 1] == "everysec"
    assert "healthcheck" in redis and "healthcheck" in postgres
    named_volumes = set(compose()["volumes"])  # type: ignore[call-overload]
    for service, path in ((redis, "/data"), (postgres, "/var/lib/postgresql/data")):
        assert {v.split(":")[0] for v in service["volumes"] if v.endswith(f":{path}")} <= (
            named_volumes
        ), service["volumes"]
        assert any(v.endswith(f":{path}") for v in service["volumes"])

    # What the container sees: the image's ENV, then compose's environment over it.
    secret = "a-secret-for-this-test-only-0123456789abcdef"
    env = _image_env() | {
        name: interpolate(str(value), {"ALGOPLANE_JWT_SECRET": secret})
        for name, value in server["environment"].items()
    }
    with pytest.raises(AssertionError, match="ALGOPLANE_JWT_SECRET must be set"):
        interpolate(str(server["environment"]["ALGOPLANE_JWT_SECRET"]), {})
    for name in [n for n in os.environ if n.startswith("ALGOPLANE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("ALGOPLANE_"):
            monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.redis_url == "redis://redis:6379/0"
    pg = postgres["environment"]
    assert settings.database_url == (
        f"postgresql+asyncpg://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{pg['POSTGRES_DB']}"
    )
    assert settings.jwt_secret == secret
    assert settings.grpc_addr == "0.0.0.0:50051"
    assert server["ports"] == [
        f"50051:{settings.grpc_addr.rsplit(':', 1)[1]}",
        f"9464:{settings.metrics_addr.rsplit(':', 1)[1]}",
        # The engine worker serves its metrics on the next port.
        f"9465:{int(settings.metrics_addr.rsplit(':', 1)[1]) + 1}",
    ]
    assert settings.engine_processes == 2
    assert settings.metrics_addr == "0.0.0.0:9464"  # reachable from outside the container


async def _healthcheck(port: int) -> tuple[int, str]:
    words = last(final_stage(), "HEALTHCHECK").exec_form()
    assert words[:3] == ["python", "-m", "clients.healthcheck"]
    assert words[3] == "127.0.0.1:" + _image_env()["ALGOPLANE_GRPC_ADDR"].rsplit(":", 1)[1]
    # The image's python is the venv the package is installed in; here it is this one.
    args = [sys.executable, *words[1:3], f"127.0.0.1:{port}"]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip()


async def test_the_healthcheck_command_passes_against_a_serving_server(server: Harness) -> None:
    for _ in range(100):  # health turns SERVING once recovery is done
        if await asyncio.to_thread(check, f"127.0.0.1:{server.port}", 1.0):
            break
        await asyncio.sleep(0.1)
    assert await _healthcheck(server.port) == (0, "SERVING")
    assert await _healthcheck(free_port()) == (1, "NOT_SERVING")
