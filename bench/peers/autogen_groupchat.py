"""The group-chat workload on AutoGen AgentChat: a RoundRobinGroupChat of
AssistantAgents, each on an instant replay model client, stopped by
MaxMessageTermination (which counts the task message, as the workload does)."""

import asyncio

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.replay import ReplayChatCompletionClient

import workload


class InstantClient(ReplayChatCompletionClient):
    """The replay client, noting when each call is made."""

    def __init__(self, calls, replies):
        super().__init__([workload.REPLY] * replies)
        self._calls = calls

    async def create(self, messages, **kwargs):
        self._calls.mark()
        return await super().create(messages, **kwargs)


async def session(peers, messages, calls):
    agents = [
        AssistantAgent(
            f"p{i}",
            model_client=InstantClient(calls, messages // peers + 1),
            system_message="You are one of the peers of a group discussion.",
        )
        for i in range(peers)
    ]
    team = RoundRobinGroupChat(agents, termination_condition=MaxMessageTermination(messages))
    result = await team.run(task=workload.TASK)
    return len(result.messages), (team, result)


def run_session(peers, messages, calls):
    return asyncio.run(session(peers, messages, calls))


if __name__ == "__main__":
    workload.main("autogen", run_session)
