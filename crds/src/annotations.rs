//! The annotations a user sets on a `UserMetadataStore` to ask the operator for
//! something, shared by the operator (which acts on them) and `kubectl umstore`
//! (which sets them).

use umstore_migrations::Migration;

/// The annotation that approves pending migrations up to a version under the
/// `Manual` policy: `umstore.io/approve-migrations: "<version>"`.
pub const APPROVE_ANNOTATION: &str = "umstore.io/approve-migrations";

/// The annotation that asks for a rotation of the transit key whenever its value
/// changes (any new value; `kubectl umstore rotate-keys` writes the time).
pub const ROTATE_ANNOTATION: &str = "umstore.io/rotate-keys";

/// The version an `umstore.io/approve-migrations` value approves up to: a number
/// (surrounding spaces allowed) that is the version of one of `embedded`; `None`
/// for anything else.
pub fn approved_version(value: &str, embedded: &[Migration]) -> Option<u32> {
    let version = value.trim().parse::<u32>().ok()?;
    embedded
        .iter()
        .any(|m| m.version == version)
        .then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use umstore_migrations::Runner;

    #[test]
    fn only_embedded_versions_are_approved() {
        let runner = Runner::default();
        let latest = runner.latest_version();
        assert_eq!(
            approved_version(&latest.to_string(), runner.migrations()),
            Some(latest)
        );
        assert_eq!(approved_version(" 1 ", runner.migrations()), Some(1));
        for value in ["v1", "", "0", "-1", &(latest + 1).to_string(), "1.0"] {
            assert_eq!(
                approved_version(value, runner.migrations()),
                None,
                "{value:?}"
            );
        }
    }
}
