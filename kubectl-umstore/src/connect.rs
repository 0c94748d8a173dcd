//! A client and a namespace, found the way kubectl finds them: `--kubeconfig`, else
//! `KUBECONFIG`, else `~/.kube/config`, else the in-cluster service account;
//! `--context`, else the current context; `-n`, else the context's namespace, else
//! `default`.

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use umstore_crds::UserMetadataStore;

use crate::error::Error;

/// Where to connect, from the command line.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--context`.
    pub context: Option<String>,
    /// `-n/--namespace`.
    pub namespace: Option<String>,
}

/// The stores of one namespace, through a client of the chosen context.
pub struct Stores {
    /// The namespaced API.
    pub api: Api<UserMetadataStore>,
    /// The namespace it is for.
    pub namespace: String,
}

impl Target {
    /// Loads the configuration and builds the client.
    pub async fn connect(&self) -> Result<Stores, Error> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        let config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let kubeconfig = Kubeconfig::read_from(path)
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
            }
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
            (None, None) => Config::infer()
                .await
                .map_err(|e| Error::Config(e.to_string()))?,
        };
        let namespace = self
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
        Ok(Stores {
            api: Api::namespaced(client, &namespace),
            namespace,
        })
    }
}
