import ArgumentParser
import Foundation
import NIOCore
import NIOPosix

/// Where running `serve`, `connect` and `cat` processes put their control sockets, one per process
/// (`PID.sock`). Unix sockets live in the file system, not in a network namespace, so `status` on
/// the host sees processes inside `ip netns exec` too.
enum ControlDirectory {
    static var path: String {
        let environment = ProcessInfo.processInfo.environment
        if let explicit = environment["NBS_CONTROL_DIR"], !explicit.isEmpty { return explicit }
        return "\(environment["XDG_RUNTIME_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/tmp")/nbs-mobility-\(getuid())"
    }

    /// Creates the directory owner-only; refuses one that another user owns or others can write,
    /// since anyone who can place a socket there could feed `status` lies.
    static func prepare() throws -> String {
        let dir = path
        if mkdir(dir, 0o700) != 0, errno != EEXIST {
            throw CLIError("cannot create the control directory \(dir): \(String(cString: strerror(errno)))", hint: "set NBS_CONTROL_DIR to a writable directory, or pass --no-control")
        }
        var info = stat()
        guard lstat(dir, &info) == 0, (info.st_mode & S_IFMT) == S_IFDIR, info.st_uid == getuid(), info.st_mode & 0o022 == 0 else {
            throw CLIError("the control directory \(dir) is not a directory owned by this user and closed to others", hint: "remove it, set NBS_CONTROL_DIR, or pass --no-control")
        }
        return dir
    }

    static func socketPath(pid: Int32 = getpid()) throws -> String { "\(try prepare())/\(pid).sock" }

    /// The control sockets present, each with the pid its name carries.
    static func sockets(in dir: String = path) -> [(pid: Int32, path: String)] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [] }
        return names.compactMap { name in
            guard name.hasSuffix(".sock"), let pid = Int32(name.dropLast(5)) else { return nil }
            return (pid, "\(dir)/\(name)")
        }.sorted { $0.pid < $1.pid }
    }
}

/// Answers every connection on the control socket with the process's status as one JSON line,
/// then closes it. Requests carry nothing, so there is nothing to parse and nothing to abuse.
final class ControlServer: Sendable {
    let path: String
    private let channel: any Channel

    private init(path: String, channel: any Channel) {
        self.path = path
        self.channel = channel
    }

    static func start(path: String, registry: SessionRegistry) async throws -> ControlServer {
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(StatusResponder(registry: registry))
                }
            }
            .bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
        chmod(path, 0o600)
        return ControlServer(path: path, channel: channel)
    }

    func close() async {
        try? await channel.close()
        unlink(path)
    }
}

private final class StatusResponder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let registry: SessionRegistry

    init(registry: SessionRegistry) { self.registry = registry }

    /// Samples every session first: with no view drawn nothing else does (Console), and then rates
    /// are averages since the previous request.
    func channelActive(context: ChannelHandlerContext) {
        let registry = self.registry
        let context = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.value.eventLoop.makeFutureWithTask { () -> ByteBuffer in
            await registry.refresh()
            var payload = (try? JSONEncoder.snakeCase.encode(registry.status())) ?? Data("{}".utf8)
            payload.append(UInt8(ascii: "\n"))
            return ByteBuffer(bytes: payload)
        }.whenSuccess { payload in
            context.value.writeAndFlush(NIOAny(payload)).whenComplete { _ in context.value.close(promise: nil) }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show every session and subflow of the running serve, connect and cat processes.",
        discussion: "Each of those commands answers on a control socket in $NBS_CONTROL_DIR (default $XDG_RUNTIME_DIR/nbs-mobility-UID, or /tmp/nbs-mobility-UID); processes in network namespaces are seen too.")

    @Option(name: .long, help: "Ask only this control socket.") var socket: String?
    @Flag(name: .long, help: "One JSON object per process, one per line.") var json = false

    func run() throws {
        let targets: [(pid: Int32?, path: String)]
        if let socket {
            targets = [(nil, socket)]
        } else {
            targets = ControlDirectory.sockets().map { ($0.pid, $0.path) }
        }
        var answered = 0
        for target in targets {
            let reply: Data
            do {
                reply = try Self.query(target.path)
            } catch {
                // A process that died without cleaning up leaves its socket behind.
                if let pid = target.pid, kill(pid, 0) != 0, errno == ESRCH {
                    unlink(target.path)
                } else if socket != nil {
                    throw CLIError("no answer on \(target.path): \(error)", hint: "is the process still running? `status` without --socket lists all")
                }
                continue
            }
            answered += 1
            if json {
                print(String(decoding: reply, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))
            } else {
                guard let status = try? JSONDecoder.snakeCase.decode(ProcessStatus.self, from: reply) else {
                    throw CLIError("\(target.path) answered with something that is not a status", hint: "is it an nbs-mobility control socket of the same version?")
                }
                print(Self.render(status).joined(separator: "\n"))
            }
        }
        if answered == 0, !json {
            print("no running nbs-mobility serve, connect or cat found in \(ControlDirectory.path)")
        }
    }

    static func render(_ status: ProcessStatus) -> [String] {
        var lines = ["pid \(status.pid)  \(status.command)  \(status.localName)\(status.port.map { "  port \($0)" } ?? "")  up "
            + String(format: "%.1f s", status.uptimeS) + "  \(status.sessions.count) session\(status.sessions.count == 1 ? "" : "s")"]
        for session in status.sessions {
            lines += LiveViewRenderer.sessionLines(session).map { "  " + $0 }
        }
        return lines
    }

    /// A blocking read to EOF: the peer closes after writing its answer. The process samples every
    /// session before answering, which takes seconds with 10,000 of them.
    static func query(_ path: String, timeoutSeconds: Int = 10) throws -> Data {
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        defer { Glibc.close(fd) }
        var timeout = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        guard path.utf8.count < capacity else { throw CLIError("control socket path too long: \(path)") }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: path.utf8)
            raw[path.utf8.count] = 0
        }
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard connected == 0 else { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
        var data = Data()
        var buffer = [UInt8](repeating: 0, count: 65536)
        while data.count < 16 << 20 {
            let n = Glibc.read(fd, &buffer, buffer.count)
            if n < 0, errno == EINTR { continue }
            guard n > 0 else {
                if n < 0 { throw POSIXError(.init(rawValue: errno) ?? .EIO) }
                break
            }
            data.append(contentsOf: buffer[0..<n])
        }
        return data
    }
}
