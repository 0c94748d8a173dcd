//! Writes the `UserMetadataStore` CRD YAML to stdout, or to the committed file with
//! `--write`. The test `committed_crd_matches_the_types` fails when they differ.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let yaml = match umstore_crds::crd_yaml() {
        Ok(yaml) => yaml,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if std::env::args().any(|a| a == "--write") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(umstore_crds::CRD_FILE);
        std::fs::write(&path, yaml).map(|()| eprintln!("wrote {}", path.display()))
    } else {
        std::io::stdout().write_all(yaml.as_bytes())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}
