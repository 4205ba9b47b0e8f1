# Builds tvix-build-vm with nixpkgs: the host binary, the static guest agent, the guest
# kernel from kernel-config/fragments, and the initrd (the agent as /init).
#
#   nix-build -A tvix-build-vm -A agent -A kernel -A initrd
#
# The initrd here is built with the host binary's own writer, so it is byte-identical to
# the one `tvix-build-vm` caches at run time.
{ pkgs ? import <nixpkgs> { } }:

let
  inherit (pkgs) lib;
  src = lib.cleanSourceWith {
    src = ./.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == ".git"));
  };
  cargoLock = { lockFile = ./Cargo.lock; };

  tvix-build-vm = pkgs.rustPlatform.buildRustPackage {
    pname = "tvix-build-vm";
    version = "0.1.0";
    inherit src cargoLock;
    cargoBuildFlags = [ "-p" "tvix-build-vm" ];
    nativeBuildInputs = [ pkgs.protobuf pkgs.pkg-config ];
    buildInputs = [ pkgs.libcap_ng pkgs.libseccomp ];
    PROTOC = "${pkgs.protobuf}/bin/protoc";
    # The test suite boots VMs; it runs in CI, not in the sandbox.
    doCheck = false;
  };

  agent = pkgs.pkgsStatic.rustPlatform.buildRustPackage {
    pname = "tvix-build-vm-agent";
    version = "0.1.0";
    inherit src cargoLock;
    cargoBuildFlags = [ "-p" "tvix-build-vm-agent" "--bin" "tvix-build-vm-agent" ];
    nativeBuildInputs = [ pkgs.protobuf ];
    PROTOC = "${pkgs.protobuf}/bin/protoc";
    doCheck = false;
  };

  kernel = pkgs.stdenv.mkDerivation {
    pname = "tvix-build-vm-kernel";
    version = pkgs.linux_6_1.version;
    src = pkgs.linux_6_1.src;
    nativeBuildInputs = with pkgs; [ bc bison flex elfutils openssl perl python3 ];
    fragments = ./kernel-config/fragments;
    configurePhase = ''
      make ARCH=x86_64 tinyconfig
      cat $fragments/*.config > fragment.config
      scripts/kconfig/merge_config.sh -m .config fragment.config
      make ARCH=x86_64 olddefconfig
      # Every requested symbol must have survived the merge.
      grep '^CONFIG_' fragment.config | while read -r line; do
        grep -qxF "$line" .config || { echo "kernel: $line did not survive" >&2; exit 1; }
      done
    '';
    buildPhase = "make ARCH=x86_64 -j$NIX_BUILD_CORES vmlinux bzImage";
    installPhase = ''
      mkdir -p $out
      cp vmlinux arch/x86/boot/bzImage $out/
      cp .config $out/config
    '';
  };

  initrd = pkgs.runCommand "tvix-build-vm-initrd" { } ''
    mkdir -p $out
    ${tvix-build-vm}/bin/tvix-build-vm initrd --agent ${agent}/bin/tvix-build-vm-agent --out $out/initrd.cpio
  '';
in
{
  inherit tvix-build-vm agent kernel initrd;
}
