fn main() -> anyhow::Result<()> {
    let probe = aya_build::Package { name: "proxy-probe", root_dir: "proxy-probe", ..Default::default() };
    aya_build::build_ebpf([probe], aya_build::Toolchain::default())
}
