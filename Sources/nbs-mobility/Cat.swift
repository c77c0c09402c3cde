import ArgumentParser
import Crypto
import Foundation
import NameBasedSockets
import NIOCore
import NIOPosix

/// netcat over a session: any shell pipeline gets a mobile, multipath byte stream.
struct Cat: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "stdin to the peer, the peer to stdout, over one session (netcat by name).",
        discussion: """
            nbs-mobility cat --listen --name NAME --port PORT      serve one session
            nbs-mobility cat --name NAME PEER_NAME:PORT            open one
            Our end of the stream finishes at EOF on stdin; the command ends when both ends have finished \
            (exit 0) or the session fails (exit 1). Reports and events go to stderr: stdout carries only the peer's bytes.
            """)

    @OptionGroup var common: CommonOptions
    @Flag(name: .long, help: "Wait for one session on --port instead of opening one.") var listen = false
    @Argument(help: "The peer, as NAME:PORT (without --listen).") var peer: String?
    @Option(name: .long, help: "TCP port to listen on (with --listen).") var port: Int?
    @Option(name: .long, help: "aggregate, handover or interactive.") var policy: MultipathPolicy = .aggregate
    @Flag(name: .long, help: "Print the session's events on stderr as they happen.") var verbose = false
    @Flag(name: .long, help: "Open no control socket (then `nbs-mobility status` does not see this process).") var noControl = false

    func validate() throws {
        if listen {
            guard peer == nil else { throw ValidationError("with --listen, give --port, not PEER") }
            guard let port, (1...65535).contains(port) else { throw ValidationError("--listen needs --port in 1...65535") }
        } else {
            guard port == nil else { throw ValidationError("--port is for --listen; to open a session give PEER_NAME:PORT") }
            guard let peer else { throw ValidationError("give PEER_NAME:PORT, or --listen --port PORT") }
            _ = try parsePeer(peer)
        }
    }

    func run() async throws {
        let options = try common.options(policy: policy)
        var listener: Listener?
        let session: Session
        if listen, let port {
            do {
                listener = try await NBS.listen(localName: common.name, port: port, options: options)
            } catch let error as NBSError {
                throw CLIError.fromListen(error, port: port)
            }
            session = try await listener!.accept()
        } else if let peer {
            let (name, port) = try parsePeer(peer)
            do {
                session = try await NBS.open(localName: common.name, peerName: name, port: port, options: options)
            } catch let error as NBSError {
                throw CLIError.from(error, peer: peer)
            }
        } else {
            throw ValidationError("give PEER_NAME:PORT, or --listen --port PORT")
        }
        // The listener stays open for this session's JOINs; other sessions are turned away.
        let turnAway = listener.map { listener in
            Task {
                while let extra = try? await listener.accept() { await extra.abort(reason: "nbs-mobility cat serves one session") }
            }
        }
        let console = await Console.start(command: "cat", localName: common.name, port: listener?.port, view: verbose ? .lines : .off,
                                          output: STDERR_FILENO, control: !noControl)
        let tracked = console.registry.track(session, role: listen ? "server" : "client", progress: .received)
        var report = TransferReport(role: listen ? "server" : "client", session: session)
        // Not an `async let`: its implicit await at scope exit would hang on a terminal's stdin
        // after the session failed.
        let sending = Task { try await Self.pumpStdin(into: session) }
        do {
            let receiver = try await Self.pumpStdout(from: session, tracked: tracked)
            let upstream = try await sending.value
            try await session.close()
            report.fill(receiver: receiver)
            report.sentBytes = upstream.bytes
            report.sentSHA256 = upstream.digest
            report.completed = true
        } catch {
            sending.cancel()
            report.error = "\(error)"
            await session.abort(reason: "\(error)")
        }
        await report.finish(tracked)
        turnAway?.cancel()
        await listener?.close()
        await console.stop()
        if common.json || verbose || !report.completed {
            FileHandle.standardError.write(Data((report.text(json: common.json) + "\n").utf8))
        }
        if !report.completed { throw ExitCode(1) }
    }

    /// stdin may be a terminal, a pipe or a regular file (which epoll cannot watch), so it is read
    /// with blocking reads on NIO's thread pool rather than on an event loop.
    static func pumpStdin(into session: Session) async throws -> (bytes: Int, digest: String) {
        var hash = SHA256()
        var total = 0
        while true {
            let chunk = try await NIOThreadPool.singleton.runIfActive { () throws -> ByteBuffer? in
                var buffer = ByteBufferAllocator().buffer(capacity: 64 * 1024)
                let n = try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 64 * 1024) { raw in
                    while true {
                        let n = read(STDIN_FILENO, raw.baseAddress, raw.count)
                        if n >= 0 { return n }
                        if errno != EINTR { throw CLIError("cannot read stdin: \(String(cString: strerror(errno)))") }
                    }
                }
                return n == 0 ? nil : buffer
            }
            guard let chunk else { break }
            chunk.withUnsafeReadableBytes { hash.update(bufferPointer: $0) }
            total += chunk.readableBytes
            try await session.write(chunk)
        }
        await session.finish()
        return (total, hex(hash.finalize()))
    }

    static func pumpStdout(from session: Session, tracked: TrackedSession) async throws -> ReceiveMeter {
        var meter = ReceiveMeter()
        while let segments = try await session.readSegments() {
            tracked.addProgress(meter.record(segments))
            try await NIOThreadPool.singleton.runIfActive {
                for segment in segments {
                    if let failure = segment.withUnsafeReadableBytes({ Terminal.writeAll(STDOUT_FILENO, $0) }) {
                        throw CLIError("cannot write stdout: \(String(cString: strerror(failure)))", hint: "the reader of stdout went away")
                    }
                }
            }
        }
        return meter
    }
}
