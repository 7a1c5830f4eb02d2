//! Puts the eBPF probe where userspace embeds it from: `$OUT_DIR/proxy-probe`.
//!
//! The probe is built from source with aya-build when the BPF toolchain is here (rustup
//! with a `nightly` that has `rust-src`, and `bpf-linker` on PATH). Without it, the
//! committed `proxy-probe/prebuilt/proxy-probe.bpf.o` is embedded instead, after checking
//! that its stamp `proxy-probe/prebuilt/SOURCE-SHA256` matches the current probe sources
//! (see [`source_digest`]), so that `cargo build` works on stable Rust with no LLVM and
//! still never embeds an object built from other sources.
//!
//! `SPLICE_PROXY_PROBE` picks the path: unset, empty or `auto` chooses as above, `source`
//! requires the toolchain, `prebuilt` always embeds the committed object.
//!
//! A successful build prints nothing of its own; the path taken is in `$OUT_DIR/probe-origin`
//! and in the `SPLICE_PROXY_PROBE_ORIGIN` compile-time variable: `source`, or
//! `prebuilt <stamp>`.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use sha2::{Digest as _, Sha256};

/// The probe package, relative to this package's root.
const PROBE_DIR: &str = "proxy-probe";
const PREBUILT_OBJECT: &str = "proxy-probe/prebuilt/proxy-probe.bpf.o";
const PREBUILT_STAMP: &str = "proxy-probe/prebuilt/SOURCE-SHA256";
/// The `bpf_target_arch` scripts/build-probe builds the prebuilt object for.
const PREBUILT_TARGET_ARCH: &str = "x86_64";
/// The toolchain aya-build runs the probe's build under (`rustup run nightly cargo ...`).
const NIGHTLY: &str = "nightly";
const SELECT_VAR: &str = "SPLICE_PROXY_PROBE";
const REGENERATE: &str = "\
Regenerate the prebuilt object and its stamp, then commit proxy-probe/prebuilt/:
    scripts/install-bpf-toolchain   # LLVM 22, bpf-linker, nightly rust-src (as root)
    scripts/build-probe";

fn main() -> Result<()> {
    println!("cargo:rerun-if-env-changed={SELECT_VAR}");
    // The inputs of both paths. (The toolchain's presence is not tracked: a prebuilt object
    // that passed the stamp check is built from the same sources as a source build.)
    println!("cargo:rerun-if-changed={PROBE_DIR}/Cargo.toml");
    println!("cargo:rerun-if-changed={PROBE_DIR}/src");
    println!("cargo:rerun-if-changed={PREBUILT_OBJECT}");
    println!("cargo:rerun-if-changed={PREBUILT_STAMP}");

    let root =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // The name userspace's `include_bytes_aligned!` expects; aya-build names it after the
    // probe's binary target.
    let object = out_dir.join("proxy-probe");

    let origin = match env::var(SELECT_VAR).as_deref() {
        Err(env::VarError::NotPresent) | Ok("" | "auto") => match missing_toolchain() {
            None => build_from_source(&object)?,
            Some(missing) => embed_prebuilt(
                &root,
                &object,
                &format!("the BPF toolchain is missing: {missing}"),
            )?,
        },
        Ok("source") => {
            if let Some(missing) = missing_toolchain() {
                bail!(
                    "{SELECT_VAR}=source, but the BPF toolchain is missing: {missing}\n\
                     Install it with scripts/install-bpf-toolchain (as root)."
                );
            }
            build_from_source(&object)?
        }
        Ok("prebuilt") => embed_prebuilt(&root, &object, &format!("{SELECT_VAR}=prebuilt"))?,
        Ok(other) => {
            bail!("{SELECT_VAR}={other:?}: expected `source`, `prebuilt` or `auto` (the default)")
        }
        Err(env::VarError::NotUnicode(other)) => {
            bail!("{SELECT_VAR}={} is not UTF-8", other.display())
        }
    };

    let origin_file = out_dir.join("probe-origin");
    fs::write(&origin_file, format!("{origin}\n"))
        .with_context(|| format!("writing {}", origin_file.display()))?;
    println!("cargo:rustc-env=SPLICE_PROXY_PROBE_ORIGIN={origin}");
    Ok(())
}

/// What building from source needs and is not here, or `None` when all of it is. Cheap
/// checks only: this runs on every build-script run, including on machines that will
/// never build the probe.
fn missing_toolchain() -> Option<String> {
    let mut missing = Vec::new();
    if let Err(err) = run(Command::new("bpf-linker").arg("--version")) {
        missing.push(format!("bpf-linker on PATH ({err:#})"));
    }
    // The same toolchain aya-build will use; never let rustup download one here.
    let sysroot = run(Command::new("rustup")
        .args(["run", NIGHTLY, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0"));
    match sysroot {
        Err(err) => missing.push(format!("the rustup toolchain `{NIGHTLY}` ({err:#})")),
        Ok(sysroot) => {
            // `-Z build-std=core` compiles core from these sources.
            let core = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
            if !core.is_dir() {
                missing.push(format!(
                    "the rust-src component of `{NIGHTLY}` (no {})",
                    core.display()
                ));
            }
        }
    }
    (!missing.is_empty()).then(|| missing.join("; "))
}

/// Runs a command to completion and returns its stdout, or why it did not succeed.
fn run(cmd: &mut Command) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    String::from_utf8(output.stdout).with_context(|| format!("{program} printed non-UTF-8"))
}

fn build_from_source(object: &Path) -> Result<String> {
    // aya-build leaves nothing behind when AYA_BUILD_SKIP is set; remove the output of an
    // earlier run so that case is reported here and not as a missing or stale include.
    match fs::remove_file(object) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("removing {}", object.display()));
        }
        _ => {}
    }
    let probe = aya_build::Package {
        name: "proxy-probe",
        root_dir: PROBE_DIR,
        ..Default::default()
    };
    let instead = format!("{SELECT_VAR}=prebuilt embeds the committed object instead");
    aya_build::build_ebpf([probe], aya_build::Toolchain::Custom(NIGHTLY))
        .with_context(|| format!("building proxy-probe from source ({instead})"))?;
    ensure!(
        object.is_file(),
        "aya-build produced no {} (is AYA_BUILD_SKIP set? {instead})",
        object.display()
    );
    Ok("source".to_owned())
}

/// Copies the committed object to `object` if its stamp matches the current sources.
/// `why` says why the prebuilt path was taken, for the error message.
fn embed_prebuilt(root: &Path, object: &Path, why: &str) -> Result<String> {
    let target_arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    ensure!(
        target_arch == PREBUILT_TARGET_ARCH,
        "{PREBUILT_OBJECT} is built for {PREBUILT_TARGET_ARCH}, not {target_arch}, and {why}.\n\
         Install the BPF toolchain with scripts/install-bpf-toolchain (as root) to build the \
         probe from source."
    );

    let stamp_file = root.join(PREBUILT_STAMP);
    let recorded = fs::read_to_string(&stamp_file)
        .with_context(|| format!("reading {}\n{REGENERATE}", stamp_file.display()))?;
    let recorded = recorded.trim();
    let current = source_digest(&root.join(PROBE_DIR))?;
    ensure!(
        recorded == current,
        "{PREBUILT_OBJECT} is stale: {PREBUILT_STAMP} records that it was built from probe \
         sources with digest {recorded}, but {PROBE_DIR}/Cargo.toml and {PROBE_DIR}/src now have \
         digest {current}.\nThe probe is not built from source here because {why}.\n{REGENERATE}"
    );

    let prebuilt = root.join(PREBUILT_OBJECT);
    fs::copy(&prebuilt, object)
        .with_context(|| format!("copying {} to {}", prebuilt.display(), object.display()))?;
    Ok(format!("prebuilt {current}"))
}

/// The stamp of the probe's sources: what `proxy-probe/prebuilt/SOURCE-SHA256` must hold
/// (followed by a newline) for the prebuilt object to be used. This is the definition;
/// scripts/build-probe computes the same value in shell.
///
/// The files are `proxy-probe/Cargo.toml` and every regular file under `proxy-probe/src`
/// (symlinks are not followed), named by their path relative to `proxy-probe/` with `/`
/// separators (`Cargo.toml`, `src/main.rs`) and sorted by the bytes of that name. Each
/// contributes the line `sha256sum` prints for it: the lowercase hex SHA-256 of its
/// contents, two spaces, its name, `\n`. The stamp is the lowercase hex SHA-256 of those
/// lines concatenated, that is, run in `proxy-probe/`:
///
/// ```sh
/// { printf 'Cargo.toml\0'; find src -type f -print0; } |
///   LC_ALL=C sort -z | xargs -0 sha256sum -- | sha256sum
/// ```
///
/// A name containing a backslash or a newline is refused, since `sha256sum` escapes those.
fn source_digest(probe_dir: &Path) -> Result<String> {
    let mut names = vec!["Cargo.toml".to_owned()];
    list_files(probe_dir, "src", &mut names)?;
    names.sort_unstable();

    let mut listing = Sha256::new();
    for name in &names {
        let path = probe_dir.join(name);
        let contents = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        listing.update(format!("{:x}  {name}\n", Sha256::digest(&contents)));
    }
    Ok(format!("{:x}", listing.finalize()))
}

/// Appends the names (relative to `base`) of the regular files under `base/dir`.
fn list_files(base: &Path, dir: &str, names: &mut Vec<String>) -> Result<()> {
    let path = base.join(dir);
    let entries = fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", path.display()))?;
        let Ok(file_name) = entry.file_name().into_string() else {
            bail!(
                "{}: the probe's file names must be UTF-8",
                entry.path().display()
            );
        };
        ensure!(
            !file_name.contains(['\\', '\n']),
            "{}: the probe's file names must not contain a backslash or newline",
            entry.path().display()
        );
        let name = format!("{dir}/{file_name}");
        let file_type = entry
            .file_type()
            .with_context(|| format!("stat {}", entry.path().display()))?;
        if file_type.is_dir() {
            list_files(base, &name, names)?;
        } else if file_type.is_file() {
            names.push(name);
        }
    }
    Ok(())
}
