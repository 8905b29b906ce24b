! relax: include/fgbi.h bound with ISO_C_BINDING, and a single-threaded Jacobi
! relaxation on one protected 256x256 grid. The module binds the calls this program
! makes; the others bind the same way (see the header's "Fortran" notes).
!
!   gfortran -std=f2008 -Wall relax.f90 -L../../target/release \
!            -Wl,-rpath,$PWD/../../target/release -lfgbi -o relax && ./relax
module fgbi
  use, intrinsic :: iso_c_binding
  implicit none
  enum, bind(c)
    enumerator :: FGBI_OK = 0, FGBI_ERR_NULL = -1, FGBI_ERR_INVALID = -2, &
      FGBI_ERR_HANDLE = -3, FGBI_ERR_STATE = -4, FGBI_ERR_UNSUPPORTED = -5, &
      FGBI_ERR_PERMISSION = -6, FGBI_ERR_TRACKING = -7, FGBI_ERR_RESOURCES = -8, &
      FGBI_ERR_SAFEPOINT = -9, FGBI_ERR_REPLICATION = -10, FGBI_ERR_PANIC = -11
  end enum
  type, bind(c) :: fgbi_summary
    integer(c_int64_t) :: epochs, verified, mismatches, dirty_pages, wire_bytes
    real(c_double) :: pause_us_p50, pause_us_p99, pause_us_max
    integer(c_int64_t) :: committed
  end type
  interface
    integer(c_int) function fgbi_protect(sizes, count, options, process) bind(c)
      import :: c_int, c_size_t, c_ptr
      integer(c_size_t), intent(in) :: sizes(*)
      integer(c_size_t), value :: count
      type(c_ptr), value :: options
      type(c_ptr), intent(out) :: process
    end function
    integer(c_int) function fgbi_region(process, index, base, len) bind(c)
      import :: c_int, c_size_t, c_ptr
      type(c_ptr), value :: process
      integer(c_size_t), value :: index
      type(c_ptr), intent(out) :: base
      integer(c_size_t), intent(out) :: len
    end function
    integer(c_int) function fgbi_safepoint_register(process, name, safepoint) bind(c)
      import :: c_int, c_char, c_ptr
      type(c_ptr), value :: process
      character(kind=c_char), intent(in) :: name(*)
      type(c_ptr), intent(out) :: safepoint
    end function
    integer(c_int) function fgbi_safepoint_pass(safepoint) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: safepoint
    end function
    integer(c_int) function fgbi_safepoint_free(safepoint) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: safepoint
    end function
    integer(c_int) function fgbi_set_state(process, data, len) bind(c)
      import :: c_int, c_size_t, c_ptr
      type(c_ptr), value :: process, data
      integer(c_size_t), value :: len
    end function
    integer(c_int) function fgbi_finish(process, summary, replica) bind(c)
      import :: c_int, c_ptr, fgbi_summary
      type(c_ptr), value :: process
      type(fgbi_summary), intent(out) :: summary
      type(c_ptr), intent(out) :: replica
    end function
    integer(c_int) function fgbi_replica_region(replica, index, base, len) bind(c)
      import :: c_int, c_size_t, c_ptr
      type(c_ptr), value :: replica
      integer(c_size_t), value :: index
      type(c_ptr), intent(out) :: base
      integer(c_size_t), intent(out) :: len
    end function
    type(c_ptr) function fgbi_last_error() bind(c)
      import :: c_ptr
    end function
  end interface
end module

program relax
  use fgbi
  implicit none
  integer, parameter :: n = 256
  type(c_ptr) :: process, safepoint, replica, base
  integer(c_size_t) :: len
  integer(c_int64_t), target :: iteration
  real(c_double), pointer :: u(:, :), copy(:, :)
  type(fgbi_summary) :: summary

  call check(fgbi_protect([int(n * n * 8, c_size_t)], 1_c_size_t, c_null_ptr, process))
  call check(fgbi_region(process, 0_c_size_t, base, len))
  call c_f_pointer(base, u, [n, n])
  call check(fgbi_safepoint_register(process, "relax" // c_null_char, safepoint))
  u(:, 1) = 100.0d0
  do iteration = 1, 2000
    u(2:n-1, 2:n-1) = 0.25d0 * (u(1:n-2, 2:n-1) + u(3:n, 2:n-1) + u(2:n-1, 1:n-2) + u(2:n-1, 3:n))
    call check(fgbi_set_state(process, c_loc(iteration), 8_c_size_t))
    call check(fgbi_safepoint_pass(safepoint))
  end do
  call check(fgbi_safepoint_free(safepoint))
  call check(fgbi_finish(process, summary, replica))
  call check(fgbi_replica_region(replica, 0_c_size_t, base, len))
  call c_f_pointer(base, copy, [n, n])
  print '(a, i0, a, i0, a, l1)', 'epochs ', summary%epochs, ' mismatches ', summary%mismatches, &
    ' replica equals live ', all(copy == u)
  if (summary%mismatches /= 0 .or. .not. all(copy == u)) error stop 1
contains
  subroutine check(status)
    integer(c_int), intent(in) :: status
    character(kind=c_char), pointer :: message(:)
    integer :: i
    if (status == FGBI_OK) return
    call c_f_pointer(fgbi_last_error(), message, [4096])
    i = 1
    do while (message(i) /= c_null_char)
      i = i + 1
    end do
    print '(a, i0, a, 4096a)', 'fgbi failed (', status, '): ', message(1:i-1)
    error stop 1
  end subroutine
end program
