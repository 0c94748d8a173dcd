//! What can go wrong, each saying what failed and what to do about it. `main` turns
//! these into one `error: ...` line and exit status 1.

use kube::core::Status;

/// The plugin's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig (or in-cluster configuration) could be loaded.
    #[error(
        "cannot load a Kubernetes configuration: {0}; point KUBECONFIG (or --kubeconfig) at a \
         kubeconfig file, or pick a context that exists with --context"
    )]
    Config(String),

    /// The store does not exist in that namespace.
    #[error(
        "no UserMetadataStore \"{name}\" in namespace \"{namespace}\"; `kubectl get ums -n \
         {namespace}` lists the stores there, and -n/--namespace picks another namespace"
    )]
    NotFound {
        /// The namespace looked in.
        namespace: String,
        /// The store's name.
        name: String,
    },

    /// The cluster does not serve the `umstore.io` API at all.
    #[error(
        "the cluster does not serve usermetadatastores.umstore.io/v1alpha1 ({message}); \
         install the umstore operator's chart (it installs the CRD) or check the kubeconfig's \
         context"
    )]
    NoCrd {
        /// The API server's words.
        message: String,
    },

    /// RBAC refused the call.
    #[error(
        "not allowed to {verb} UserMetadataStore \"{name}\" in namespace \"{namespace}\": \
         {message}; {hint}"
    )]
    Forbidden {
        /// `read` or `change`.
        verb: &'static str,
        /// The namespace.
        namespace: String,
        /// The store's name.
        name: String,
        /// The API server's words (they name the user).
        message: String,
        /// Which role grants it.
        hint: &'static str,
    },

    /// The plugin refused the change before sending it; nothing was changed.
    #[error("cannot {what}: {message}")]
    Refused {
        /// What was asked, with the store (`promote umstore/pilot to tier 1`).
        what: String,
        /// Why not: the operator's or the CRD's words.
        message: String,
    },

    /// The API server refused the change (a CRD rule); its message is passed on as is.
    #[error("cannot {what}: the API server refused it: {message}")]
    Rejected {
        /// What was asked, with the store.
        what: String,
        /// The API server's words.
        message: String,
    },

    /// The store changed between reading it and writing to it.
    #[error(
        "UserMetadataStore {namespace}/{name} changed while this command ran, so nothing was \
         changed; run the command again"
    )]
    Conflict {
        /// The namespace.
        namespace: String,
        /// The store's name.
        name: String,
    },

    /// The object is there but is not a UserMetadataStore this plugin can read.
    #[error(
        "UserMetadataStore {namespace}/{name} cannot be read: {cause}; `kubectl get ums {name} \
         -n {namespace} -o yaml` shows it as stored (is this plugin older than the operator?)"
    )]
    Unreadable {
        /// The namespace.
        namespace: String,
        /// The store's name.
        name: String,
        /// What did not parse.
        cause: Box<kube::Error>,
    },

    /// Any other failure talking to the API server.
    #[error("{doing} UserMetadataStore {namespace}/{name}: {cause}")]
    Api {
        /// `reading` or `patching`.
        doing: &'static str,
        /// The namespace.
        namespace: String,
        /// The store's name.
        name: String,
        /// The client's error.
        cause: Box<kube::Error>,
    },

    /// The status could not be printed as JSON or YAML.
    #[error("printing the status as {format}: {message}")]
    Output {
        /// `json` or `yaml`.
        format: &'static str,
        /// The serializer's words.
        message: String,
    },
}

/// What a call to the API server was for, to tell its errors apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// A GET of the store.
    Read,
    /// A PATCH of the store, for the change described.
    Change,
}

impl Error {
    /// Sorts a client error from a call on store `namespace/name` into what to tell
    /// the user; `what` describes the change (for refusals of a PATCH).
    pub fn from_kube(e: kube::Error, call: Call, namespace: &str, name: &str, what: &str) -> Self {
        let (namespace, name) = (namespace.to_string(), name.to_string());
        let status: &Status = match &e {
            kube::Error::Api(status) => status,
            kube::Error::SerdeError(_) => {
                return Self::Unreadable {
                    namespace,
                    name,
                    cause: Box::new(e),
                }
            }
            _ => {
                return Self::Api {
                    doing: doing(call),
                    namespace,
                    name,
                    cause: Box::new(e),
                }
            }
        };
        match status.code {
            // A missing object names itself in the details; a missing resource type
            // ("the server could not find the requested resource") does not.
            404 if status.details.as_ref().is_some_and(|d| !d.name.is_empty()) => {
                Self::NotFound { namespace, name }
            }
            404 => Self::NoCrd {
                message: status.message.clone(),
            },
            403 => Self::Forbidden {
                verb: match call {
                    Call::Read => "read",
                    Call::Change => "change",
                },
                namespace,
                name,
                message: status.message.clone(),
                hint: match call {
                    Call::Read => {
                        "reading a store needs get on usermetadatastores.umstore.io, which the \
                         chart's umstore-view ClusterRole (and Kubernetes' view role) grants"
                    }
                    Call::Change => {
                        "changing a store needs patch on usermetadatastores.umstore.io, which \
                         the chart's umstore-edit ClusterRole (and Kubernetes' edit role) grants"
                    }
                },
            },
            409 => Self::Conflict { namespace, name },
            400 | 422 if call == Call::Change => Self::Rejected {
                what: what.to_string(),
                message: status.message.clone(),
            },
            _ => Self::Api {
                doing: doing(call),
                namespace,
                name,
                cause: Box::new(e),
            },
        }
    }
}

fn doing(call: Call) -> &'static str {
    match call {
        Call::Read => "reading",
        Call::Change => "patching",
    }
}
