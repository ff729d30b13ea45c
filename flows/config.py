"""Where the flows find the registry, the policy and their scratch space (environment variables,
so a work pool's job variables or a deployment can set them)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from scanner.policy import Policy, load_policy
from scanner.registry import Registry


class FlowConfig(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    tracking_uri: str = Field("sqlite:///mlflow.db",
                              validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "TROJANSCAN_TRACKING_URI"))
    policy: Path | None = Field(None, validation_alias="TROJANSCAN_POLICY")
    workdir: Path = Field(Path("trojanscan-work"), validation_alias="TROJANSCAN_WORKDIR")

    def registry(self) -> Registry:
        return Registry(self.tracking_uri)

    def load_policy(self) -> Policy:
        return load_policy(self.policy)
