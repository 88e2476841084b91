//! The capability registry: `whet capabilities push capability.yaml` publishes the policy
//! scaffold a model is adapted to — its system prompt and tools — as an immutable
//! `name@version`. SFT prepends the system prompt to every conversation and passes the tools to
//! the chat template; a job naming an unpublished version is refused.
//!
//! ```yaml
//! schema: 1
//! name: support-agent            # ^[a-z0-9][a-z0-9-]*$
//! version: 1.0.0                 # semver
//! description: Answers billing questions.
//! system_prompt: You are a billing assistant.
//! tools:                         # JSON-schema functions (OpenAI's tool format)
//!   - type: function
//!     function:
//!       name: lookup_invoice
//!       description: Finds an invoice.
//!       parameters: {type: object, properties: {id: {type: string}}, required: [id]}
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::home::sha256_bytes;
use crate::store::{Pushed, Store};
use crate::{check_name, check_version, JobError};

const KIND: &str = "capability";

/// `capability.yaml`, schema 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// The file's schema version: 1.
    pub schema: u32,
    /// `^[a-z0-9][a-z0-9-]*$`.
    pub name: String,
    /// A pinned semver version.
    pub version: String,
    /// What the capability is for.
    #[serde(default)]
    pub description: String,
    /// The system prompt every conversation starts with.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Function tools, `{"type": "function", "function": {name, description, parameters}}`
    /// (the bare `{name, description, parameters}` form is accepted and normalised).
    #[serde(default)]
    pub tools: Vec<Value>,
    /// The platform's agents, skills and flags: kept with the version, not used by training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Value>,
    /// See `agents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills: Option<Value>,
    /// See `agents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Value>,
}

impl Capability {
    /// Parses and checks `capability.yaml` text; errors name the field.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let mut c: Self = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        c.tools = c.tools.iter().map(normalize_tool).collect();
        Ok(c)
    }

    /// Reads and checks a `capability.yaml`.
    pub fn from_file(path: &Path) -> Result<Self, JobError> {
        let text = std::fs::read_to_string(path).map_err(|e| JobError::io(path, e))?;
        Self::from_yaml(&text).map_err(|e| JobError::Invalid(format!("{}: {e}", path.display())))
    }

    fn check(&self) -> Result<(), String> {
        if self.schema != 1 {
            return Err(format!(
                "schema: {} is not supported (expected 1)",
                self.schema
            ));
        }
        check_name("name", &self.name).map_err(|e| e.to_string())?;
        check_version("version", &self.version).map_err(|e| e.to_string())?;
        for (i, tool) in self.tools.iter().enumerate() {
            let f = normalize_tool(tool);
            let name = f["function"]["name"].as_str().unwrap_or("");
            if name.trim().is_empty() {
                return Err(format!("tools[{i}]: a function tool needs function.name"));
            }
            if f["type"] != "function" {
                return Err(format!("tools[{i}] ({name}): type must be \"function\""));
            }
            let params = &f["function"]["parameters"];
            if !params.is_null()
                && (!params.is_object() || params.get("type").is_some_and(|t| t != "object"))
            {
                return Err(format!(
                    "tools[{i}] ({name}): parameters must be a JSON schema of type object"
                ));
            }
        }
        Ok(())
    }

    /// `name@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// sha256 of the capability's canonical JSON.
    pub fn digest(&self) -> String {
        sha256_bytes(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }
}

/// `{name, description, parameters}` → `{"type": "function", "function": {...}}`.
fn normalize_tool(tool: &Value) -> Value {
    if tool.get("function").is_some() || tool.get("name").is_none() {
        tool.clone()
    } else {
        json!({"type": "function", "function": tool})
    }
}

/// Publishes a capability version (immutable: the same content again is a no-op).
pub fn push(store: &mut Store, cap: &Capability) -> Result<Pushed, JobError> {
    let digest = cap.digest();
    let mut doc = serde_json::to_value(cap).map_err(|e| JobError::Invalid(e.to_string()))?;
    doc["digest"] = json!(digest);
    doc["created_at"] = json!(crate::now_rfc3339());
    store.push(
        KIND,
        &cap.name,
        &cap.version,
        &digest,
        &doc,
        &crate::now_rfc3339(),
    )
}

/// The published capability `name@version` and its digest; an unpublished version is an error
/// listing the published ones.
pub fn get(store: &Store, reference: &str) -> Result<(Capability, String), JobError> {
    let (name, version) = reference.split_once('@').ok_or_else(|| {
        JobError::Invalid(format!("capability {reference:?}: expected name@version"))
    })?;
    let doc = store.registry_require(
        KIND,
        name,
        version,
        "whet capabilities push capability.yaml",
    )?;
    let digest = doc["digest"].as_str().unwrap_or_default().to_string();
    let mut body = doc;
    if let Some(m) = body.as_object_mut() {
        m.remove("digest");
        m.remove("created_at");
    }
    let cap = serde_json::from_value(body)
        .map_err(|e| JobError::Store(format!("capability {reference}: stored document: {e}")))?;
    Ok((cap, digest))
}

/// Every published capability version.
pub fn list(store: &Store) -> Result<Vec<Value>, JobError> {
    store.registry_list(KIND, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = "schema: 1
name: support
version: 1.0.0
description: Billing help.
system_prompt: You are a billing assistant.
tools:
  - name: lookup_invoice
    description: Finds an invoice.
    parameters:
      type: object
      properties:
        id: {type: string}
      required: [id]
";

    #[test]
    fn a_capability_parses_normalises_tools_and_publishes_once() {
        let c = Capability::from_yaml(YAML).unwrap();
        assert_eq!(c.tools[0]["type"], "function");
        assert_eq!(c.tools[0]["function"]["name"], "lookup_invoice");
        assert_eq!(c.tools[0]["function"]["parameters"]["required"][0], "id");
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("db")).unwrap();
        assert_eq!(push(&mut store, &c).unwrap(), Pushed::Created);
        assert_eq!(push(&mut store, &c).unwrap(), Pushed::Unchanged);
        let (back, digest) = get(&store, "support@1.0.0").unwrap();
        assert_eq!((back, digest), (c.clone(), c.digest()));
        let changed = Capability {
            system_prompt: Some("Other.".into()),
            ..c
        };
        assert!(push(&mut store, &changed)
            .unwrap_err()
            .to_string()
            .contains("immutable"));
        let e = get(&store, "support@2.0.0").unwrap_err().to_string();
        assert!(e.contains("not published") && e.contains("1.0.0"), "{e}");
        let e = get(&store, "other@1.0.0").unwrap_err().to_string();
        assert!(e.contains("no capability named"), "{e}");
    }

    #[test]
    fn mistakes_name_the_field() {
        let e = Capability::from_yaml(&YAML.replace("schema: 1", "schema: 2")).unwrap_err();
        assert!(e.contains("schema"), "{e}");
        let e =
            Capability::from_yaml(&YAML.replace("name: support", "name: Support Bot")).unwrap_err();
        assert!(e.contains("name"), "{e}");
        let e = Capability::from_yaml(&YAML.replace("1.0.0", "1.0")).unwrap_err();
        assert!(e.contains("version"), "{e}");
        let e = Capability::from_yaml(&YAML.replace("description:", "descripton:")).unwrap_err();
        assert!(e.contains("descripton"), "{e}");
        let e = Capability::from_yaml(&YAML.replace("type: object", "type: string")).unwrap_err();
        assert!(e.contains("tools[0]"), "{e}");
    }
}
