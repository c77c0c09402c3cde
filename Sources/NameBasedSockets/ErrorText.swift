import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A socket error as a person reads it: NIO's IOError text names the syscall wrapper
/// ("connection reset (error set): Connection refused) (errno: 111)"); the errno's own words say it.
func readableSocketError(_ error: any Error) -> String {
    if let io = error as? IOError { return String(cString: strerror(io.errnoCode)).lowercased() }
    if let channel = error as? ChannelError, case .connectTimeout(let t) = channel { return "no answer within \(t)" }
    return "\(error)"
}
