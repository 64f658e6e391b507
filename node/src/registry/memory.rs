//! In-memory [`Registry`] for tests and the simulator.

use super::{Registry, RegistryError, VolumeSpec};
use async_trait::async_trait;
use metro_quorum::{ClusterConfig, NodeRecord};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default)]
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, NodeRecord>,
    bootstrap: Option<String>,
    specs: BTreeMap<String, VolumeSpec>,
    status: Option<String>,
    config: Option<(ClusterConfig, i64)>,
    revision: i64,
    /// Bumped on every spec put or removal.
    specs_version: i64,
    down: bool,
}

impl MemoryRegistry {
    /// Simulate etcd being unreachable.
    pub fn set_down(&self, down: bool) {
        self.inner.lock().expect("poisoned").down = down;
    }

    fn guard(&self) -> Result<std::sync::MutexGuard<'_, Inner>, RegistryError> {
        let g = self.inner.lock().expect("poisoned");
        if g.down {
            return Err(RegistryError::Unavailable("memory registry is down".into()));
        }
        Ok(g)
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, rec: &NodeRecord) -> Result<(), RegistryError> {
        self.guard()?.nodes.insert(rec.id.clone(), rec.clone());
        Ok(())
    }
    async fn nodes(&self) -> Result<Vec<NodeRecord>, RegistryError> {
        Ok(self.guard()?.nodes.values().cloned().collect())
    }
    async fn claim_bootstrap(&self, node: &str) -> Result<String, RegistryError> {
        Ok(self.guard()?.bootstrap.get_or_insert_with(|| node.to_string()).clone())
    }
    async fn put_spec(&self, spec: &VolumeSpec, create_only: bool) -> Result<(), RegistryError> {
        let mut g = self.guard()?;
        if create_only && g.specs.contains_key(&spec.name) {
            return Err(RegistryError::AlreadyExists(spec.name.clone()));
        }
        g.specs.insert(spec.name.clone(), spec.clone());
        g.specs_version += 1;
        Ok(())
    }
    async fn remove_spec(&self, name: &str) -> Result<(), RegistryError> {
        let mut g = self.guard()?;
        if g.specs.remove(name).is_some() {
            g.specs_version += 1;
        }
        Ok(())
    }
    async fn specs_version(&self) -> Result<(i64, i64), RegistryError> {
        let g = self.guard()?;
        Ok((g.specs_version, g.specs.len() as i64))
    }
    async fn specs(&self) -> Result<Vec<VolumeSpec>, RegistryError> {
        Ok(self.guard()?.specs.values().cloned().collect())
    }
    async fn put_status(&self, json: &str) -> Result<(), RegistryError> {
        self.guard()?.status = Some(json.to_string());
        Ok(())
    }
    async fn status(&self) -> Result<Option<String>, RegistryError> {
        Ok(self.guard()?.status.clone())
    }
    async fn config(&self) -> Result<Option<(ClusterConfig, i64)>, RegistryError> {
        Ok(self.guard()?.config.clone())
    }
    async fn put_config(&self, new: &ClusterConfig, expected: Option<i64>) -> Result<(), RegistryError> {
        let mut g = self.guard()?;
        if g.config.as_ref().map(|(_, rev)| *rev) != expected {
            return Err(RegistryError::Conflict("config".into()));
        }
        g.revision += 1;
        g.config = Some((new.clone(), g.revision));
        Ok(())
    }
    async fn health(&self) -> Vec<(String, bool)> {
        vec![("memory".into(), !self.inner.lock().expect("poisoned").down)]
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_memory_registry_passes_the_conformance_suite() {
        super::super::conformance(&super::MemoryRegistry::default()).await;
    }
}
