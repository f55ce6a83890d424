"""A real S3 API on loopback for the s3:// initializer tests: moto's server mode (`moto_server`,
from PyPI's moto[server]) in a subprocess, spoken to with boto3 over HTTP like any S3-compatible
store. Authentication is switched on after the set-up (moto's /moto-api/reset-auth): from then
on only the IAM access key made here signs valid requests, so a wrong credential is refused the
way S3 refuses it (InvalidAccessKeyId / SignatureDoesNotMatch)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

import boto3

SETUP_KEYS = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}  # accepted while auth is off
REGION = "us-east-1"
READ_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen

    def client(self, **keys: str):
        creds = keys or {"aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, **creds)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3_server() -> Iterator[S3Server]:
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, **SETUP_KEYS)
        iam.create_user(UserName="kubetune")
        iam.put_user_policy(UserName="kubetune", PolicyName="s3", PolicyDocument=json.dumps(READ_ALL))
        key = iam.create_access_key(UserName="kubetune")["AccessKey"]
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=5).read()  # from now on, requests must be signed by that key
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
