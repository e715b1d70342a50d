"""The group-chat workload on LangGraph: a StateGraph over MessagesState with one node
per agent, each calling an instant fake chat model on the whole message list, edges
in a ring and a conditional edge to END once the list holds M messages."""

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import HumanMessage
from langgraph.graph import END, START, MessagesState, StateGraph

import workload


def build(peers, messages, calls):
    model = FakeListChatModel(responses=[workload.REPLY])

    def agent(name):
        def node(state: MessagesState):
            calls.mark()
            reply = model.invoke(state["messages"])
            reply.name = name
            return {"messages": [reply]}

        return node

    names = [f"p{i}" for i in range(peers)]
    graph = StateGraph(MessagesState)
    for name in names:
        graph.add_node(name, agent(name))
    graph.add_edge(START, names[0])
    for name, after in zip(names, names[1:] + names[:1]):
        graph.add_conditional_edges(
            name, lambda state, after=after: END if len(state["messages"]) >= messages else after, [after, END]
        )
    return graph.compile()


def run_session(peers, messages, calls):
    app = build(peers, messages, calls)
    state = app.invoke(
        {"messages": [HumanMessage(workload.TASK)]},
        {"recursion_limit": messages + 10},
    )
    return len(state["messages"]), (app, state)


if __name__ == "__main__":
    workload.main("langgraph", run_session)
