# Homebrew formula for rsockd (macOS: BPF device + pf anchor backend; Linux via Homebrew works too
# but the Debian package is the way there).
#
# url/sha256: the release asset is the tarball that packaging/source-tarball.sh makes from
# `git archive` (reproducible: gzip -n) — on the release tag run
#   RSOCKD_SOURCE=head packaging/source-tarball.sh
# upload build/dist/rsockd-<version>.tar.gz as the release asset and put the sha256 it prints
# here (in the tap's copy of this file: a tarball cannot hold its own checksum).  The owner in the
# URL is a placeholder until the project has its public home; the sha256 below is that command's
# output at commit 26facd3 (before packaging/ was committed).  tests/unit/test_homebrew_formula.py
# checks that url, version and pyproject.toml agree.
class Rsockd < Formula
  include Language::Python::Virtualenv

  desc "Carry UDP traffic inside fake TCP segments (rsock-compatible tunnel daemon)"
  homepage "https://github.com/rsockd/rsockd"
  url "https://github.com/rsockd/rsockd/releases/download/v0.1.0/rsockd-0.1.0.tar.gz"
  sha256 "3d7e35b1662b8f2c4b06bf66017dd258f280f32c7f992f1c652cf6fc5072eccf"
  license "MIT"

  depends_on "python@3.12"

  # The example's runtime_dir line, and what it becomes in a macOS etc/rsockd/rsockd.toml.
  MACOS_RUNTIME_DIR = ['#runtime_dir = "/run/rsockd"', 'runtime_dir = "/var/run/rsockd"'].freeze

  # No resource blocks: of pyproject.toml's dependencies, pyroute2 and sdnotify are marked
  # sys_platform == 'linux' and tomli python_version < '3.11', so on macOS with Python 3.12 rsockd
  # needs nothing from PyPI at run time.  (The build requirements, setuptools and mypy, come into
  # pip's isolated build environment: virtualenv_install_with_resources builds with isolation;
  # mypyc then compiles rsockd's core with the Xcode command line tools' clang, setup.py.)
  # tests/unit/test_homebrew_formula.py keeps the resources equal to pyproject's non-Linux
  # dependencies.

  def install
    virtualenv_install_with_resources
    pkgshare.install "packaging/rsockd.toml.example", "packaging/checksum-samples.txt"
    # rsockd(8), rsockctl(8), rsockd.toml(5): whatever docs/man/ holds.
    man5.install Dir["docs/man/*.5"]
    man8.install Dir["docs/man/*.8"]
  end

  def post_install
    # etc is kept across upgrades: install the commented example only where there is none yet.
    (etc/"rsockd").mkpath
    config = etc/"rsockd/rsockd.toml"
    return if config.exist?

    cp pkgshare/"rsockd.toml.example", config
    # macOS has no /run: the control socket goes under /var/run (docs/macos.md).
    inreplace config, MACOS_RUNTIME_DIR.first, MACOS_RUNTIME_DIR.last if OS.mac?
  end

  def caveats
    <<~EOS
      Edit #{etc}/rsockd/rsockd.toml (uncomment the server or the client block), then:
        sudo brew services start rsockd
      rsockd needs root for the BPF devices and its pf anchor.
    EOS
  end

  service do
    run [opt_bin/"rsockd", "--config", etc/"rsockd/rsockd.toml"]
    require_root true
    keep_alive true
    log_path var/"log/rsockd.log"
    error_log_path var/"log/rsockd.log"
  end

  test do
    assert_match version.to_s, shell_output("#{bin}/rsockd --version")

    # rsockctl verify-checksum on the bundled samples (ADDRS DATA EXPECTED per line): each
    # becomes a tcp_addrs_N.txt / tcp_data_N.dat pair, and the output must be the expected
    # PASS/FAIL sequence; the samples hold both, so the exit status is 1.
    samples = (pkgshare/"checksum-samples.txt").readlines.map(&:split)
                                               .reject { |f| f.empty? || f.first.start_with?("#") }
    assert_operator samples.length, :>=, 2
    pairs = testpath/"pairs"
    pairs.mkpath
    samples.each.with_index(1) do |(addrs, data, _expected), n|
      (pairs/"tcp_addrs_#{n}.txt").write "#{addrs.tr(",", " ")}\n"
      (pairs/"tcp_data_#{n}.dat").binwrite [data].pack("H*")
    end
    assert_equal samples.map(&:last), shell_output("#{bin}/rsockctl verify-checksum #{pairs}", 1).split
    first = samples.index { |s| s.last == "PASS" } + 1
    assert_equal "PASS\n",
                 shell_output("#{bin}/rsockctl verify-checksum #{pairs}/tcp_addrs_#{first}.txt " \
                              "#{pairs}/tcp_data_#{first}.dat")

    # Without root the daemon refuses with one clear line, not a traceback.
    (testpath/"rsockd.toml").write <<~EOS
      role = "server"
      target = "127.0.0.1:8388"
    EOS
    output = pipe_output("#{bin}/rsockd --config #{testpath}/rsockd.toml 2>&1")
    refute_predicate $CHILD_STATUS, :success?
    assert_match(/must run as root/, output)
    refute_match(/Traceback/, output)
  end
end
