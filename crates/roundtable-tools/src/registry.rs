//! Every tool of a team, built once from its [`ToolSpec`]s.
//!
//! A declared tool (`[tools.NAME]`) is one [`Tool`] for `command` and `http`, and the
//! allowed tools of the server for `mcp` (each server started once, its tools sharing
//! it). Built-ins are the runtime's own and are not built here. Peers are granted
//! declared names: [`Registry::granted`] gives what a name stands for.
//!
//! Names the models see must be unique across the team: two declared tools offering
//! the same name (an MCP tool named like a command tool, or like a built-in) are an
//! error naming both.

use std::collections::BTreeMap;
use std::sync::Arc;

use roundtable_core::tool::{Builtin, Tool, ToolBox, ToolDef, ToolKind, ToolSpec};

use crate::Problem;
use crate::command::CommandTool;
use crate::http::{HttpTool, http_client};
use crate::mcp::{McpError, McpServer};

/// Everything wrong with one declared tool's spec, each with the key it concerns
/// (under `tools.NAME`). Builtins have nothing to check here.
pub fn validate(spec: &ToolSpec) -> Vec<Problem> {
    match &spec.kind {
        ToolKind::Command(c) => crate::command::validate(c),
        ToolKind::Http(h) => crate::http::validate(h),
        ToolKind::Mcp(m) => crate::mcp::validate(m),
        ToolKind::Builtin { .. } => Vec::new(),
    }
}

/// Why a team's tools could not be built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// A spec is wrong: the declared tool and its problems.
    Config { tool: String, problems: Vec<Problem> },
    /// An MCP server could not be started or listed.
    Mcp { tool: String, error: McpError },
    /// Two declared tools offer a tool of the same name.
    DuplicateName { name: String, first: String, second: String },
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Config { tool, problems } => {
                let list: Vec<String> = problems.iter().map(|p| format!("tools.{tool}.{p}")).collect();
                write!(f, "{}", list.join("; "))
            }
            RegistryError::Mcp { tool, error } => write!(f, "tools.{tool}: {error}"),
            RegistryError::DuplicateName { name, first, second } => {
                write!(f, "tools.{first} and tools.{second} both offer a tool named {name:?}")
            }
        }
    }
}

impl std::error::Error for RegistryError {}

/// The built tools of a team.
#[derive(Default)]
pub struct Registry {
    /// Declared name → the tools it stands for.
    by_declared: BTreeMap<String, Vec<Arc<dyn Tool>>>,
    servers: Vec<Arc<McpServer>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: BTreeMap<&str, Vec<&str>> = self
            .by_declared
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().map(|t| t.def().name.as_str()).collect()))
            .collect();
        f.debug_struct("Registry").field("tools", &names).finish()
    }
}

impl Registry {
    /// Builds every non-builtin tool in `specs`, starting each MCP server once. The
    /// first failure stops the build (servers already started are stopped).
    pub async fn build(specs: &[ToolSpec]) -> Result<Registry, RegistryError> {
        let mut registry = Registry::default();
        let mut offered: BTreeMap<String, String> =
            Builtin::ALL.iter().map(|b| (b.as_str().to_owned(), "builtin".to_owned())).collect();
        let mut client = None;
        for spec in specs {
            let config = |problems| RegistryError::Config { tool: spec.name.clone(), problems };
            let tools: Vec<Arc<dyn Tool>> = match &spec.kind {
                ToolKind::Builtin { .. } => continue,
                ToolKind::Command(c) => vec![Arc::new(CommandTool::new(spec, c).map_err(config)?)],
                ToolKind::Http(h) => {
                    if client.is_none() {
                        client = Some(http_client().map_err(|m| config(vec![Problem::new("url", m)]))?);
                    }
                    let client = client.clone().unwrap_or_default();
                    vec![Arc::new(HttpTool::new(spec, h, client).map_err(config)?)]
                }
                ToolKind::Mcp(m) => {
                    let server = McpServer::start(spec, m)
                        .await
                        .map_err(|error| RegistryError::Mcp { tool: spec.name.clone(), error })?;
                    let tools = server.into_tools();
                    registry.servers.push(server);
                    tools
                }
            };
            for tool in &tools {
                let name = &tool.def().name;
                if let Some(first) = offered.get(name) {
                    return Err(RegistryError::DuplicateName {
                        name: name.clone(),
                        first: first.clone(),
                        second: spec.name.clone(),
                    });
                }
                offered.insert(name.clone(), spec.name.clone());
            }
            registry.by_declared.insert(spec.name.clone(), tools);
        }
        Ok(registry)
    }

    /// The tools a declared name stands for (empty for an unknown name or a builtin).
    pub fn granted(&self, declared: &str) -> &[Arc<dyn Tool>] {
        self.by_declared.get(declared).map_or(&[], Vec::as_slice)
    }

    /// Every built tool.
    pub fn tools(&self) -> impl Iterator<Item = &Arc<dyn Tool>> {
        self.by_declared.values().flatten()
    }

    /// A tool by the name the model sees.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Tool>> {
        self.tools().find(|t| t.def().name == name)
    }

    /// The tools by grant name, as peers take them.
    pub fn tool_box(&self) -> ToolBox {
        let mut tool_box = ToolBox::new();
        for (declared, tools) in &self.by_declared {
            for tool in tools {
                tool_box.insert(declared.clone(), Arc::clone(tool));
            }
        }
        tool_box
    }

    /// Each MCP server's declared name and the tools it listed at start (allowed
    /// ones): what the runtime records on the log.
    pub fn mcp_listings(&self) -> Vec<(String, Vec<ToolDef>)> {
        self.servers.iter().map(|s| (s.name().to_owned(), s.tools().to_vec())).collect()
    }
}
